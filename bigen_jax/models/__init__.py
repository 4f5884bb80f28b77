"""Models: ``lxmert`` (the unified transformer), ``layers`` (its blocks), ``heads``, ``masks`` (task input
layouts), ``flops`` (analytic FLOP counts), ``inception`` (InceptionV3 for FID)."""
