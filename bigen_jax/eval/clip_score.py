"""CLIPScore from image and text embeddings of any image-text encoder (the embeddings are normalised here).

``clip_score``: the paper's score of generated images, 100 x max(cosine, 0). ``captioning_clip_score``:
Hessel et al.'s (2021) reference-free captioning metric CLIP-S, 2.5 x max(cosine, 0).
"""

import numpy as np


def cosine(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity of image_emb [N, D] and text_emb [N, D] -> [N] (float64)."""
  a, b = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"expected aligned embeddings [N, D], got {a.shape} and {b.shape}")
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return np.sum(a * b, axis=-1)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
  """100 x max(cosine, 0) per aligned (image [N, D], caption [N, D]) pair -> [N]; average it for the metric."""
  return 100.0 * np.maximum(cosine(image_emb, text_emb), 0.0)


def captioning_clip_score(image_emb: np.ndarray, text_emb: np.ndarray, *, weight: float = 2.5) -> np.ndarray:
  """CLIP-S = ``weight`` x max(cosine, 0) (w = 2.5, Hessel et al.) per aligned pair [N, D] -> [N]."""
  return weight * np.maximum(cosine(image_emb, text_emb), 0.0)
