"""bigen_jax."""
