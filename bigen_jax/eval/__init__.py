"""Evaluation: evaluators by name (``registry``; ``validation_loss``, ``captioning``, ``generation``), the
metrics they use (``caption_metrics``, ``cider``, ``fid``, ``clip_score``, ``r_precision``),
the eval set they share (``eval_set``) and the plug-ins of data sources that add a world's scoring
(``sources``)."""
