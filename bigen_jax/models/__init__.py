"""Models: ``lxmert`` (the unified transformer), ``layers`` (its blocks), ``heads``, ``apply`` (one call of the
model and a head, for tasks, decoders and evaluators), ``flops`` (analytic FLOP counts), ``inception``
(InceptionV3 for FID)."""
