"""The captioned-scenes world: shapes, colours, sizes, counts and spatial relations drawn on textured backgrounds,
with five captions, a scene graph, hard negatives and question-answer pairs per image.

  world          scene graphs, examples, the named datasets; re-exports what users need
  lexicon        the words and the geometry of relation words
  grammar        captions -> claims, truth against a scene graph, hard negatives
  captions, qa   captions and question-answer pairs of a scene graph
  render         scene graph -> picture
  tfds_builder   the TFDS dataset and ``source`` (the one module that needs TensorFlow)
  detector       the PyTorch grid detector: the world's feature backbone (``--backbone scenes_detector``)
  scene_decoder  cluster ids -> pictures, through the detector's heads and the renderer
  recognizer_model, recognizer   the Flax scene recogniser: model; training, I/O, reading
  semantic       truth of captions and of drawn images (what the evaluators report)
  plugin         the world's plug-in for the generic evaluators (``bigen_jax.eval.sources``)

Nothing here but ``tfds_builder`` imports TensorFlow; nothing is imported by this file.
"""
