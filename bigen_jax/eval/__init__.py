"""Evaluation: evaluators by name (``registry``; ``validation_loss``, ``captioning``, ``generation``), the
metrics they use (``caption_metrics``, ``cider``, ``fid``, ``clip_score``, ``r_precision``,
``scene_recognizer``) and the eval set they share (``eval_set``)."""
