"""One-time PyTorch grid-feature extraction (used by ``tools/extract_features.py`` only).

``backbones``: ``build_backbone(name, ...)`` maps uint8 RGB images to ``[B, 64, D]`` float32 grid features.
``extract``: ``extract_split(...)`` writes TFRecord shards + ``manifest.json`` in the ``data.records`` schema.

Nothing here is imported by the JAX package; torch is needed only when these modules are imported.
"""
