"""Embedded worlds: procedurally generated data sources with their own truth, kept apart from the library.

A world is a package ``bigen_jax.worlds.<name>`` whose records name it in their manifest (``source.name``); its
``plugin`` module gives the generic evaluators its scoring (``bigen_jax.eval.sources``). The library never imports
a world.
"""
