"""Analytic FLOP counts of the unified transformer (for throughput and MFU reports).

Counts matmul FLOPs (2 per multiply-add) of the dense layers and attention (scores and weighted sum);
normalisation, activations and softmax are ignored. Training = forward + backward = 3x forward.
"""

import ml_collections


def _attention(q_len: int, kv_len: int, h: int) -> int:
  """Multiply-adds of one attention block: q, output over q_len; k, v over kv_len; scores and mix."""
  return 2 * q_len * h * h + 2 * kv_len * h * h + 2 * q_len * kv_len * h


def _ffn(length: int, h: int, f: int) -> int:
  return 2 * length * h * f


def forward_flops(config: ml_collections.ConfigDict, *, text_len: int | None = None, num_cells: int | None = None,
                  text_logits: bool = False, image_logits: bool = False) -> int:
  """Forward FLOPs of one example (encoders, plus the heads asked for)."""
  h, f = config.hidden_size, config.mlp_dim
  length = config.max_len if text_len is None else text_len
  m = config.num_cells if num_cells is None else num_cells
  macs = m * (config.visual_feat_dim + config.visual_pos_dim) * h
  macs += config.num_language_layers * (_attention(length, length, h) + _ffn(length, h, f))
  macs += config.num_vision_layers * (_attention(m, m, h) + _ffn(m, h, f))
  cross = (_attention(length, m, h) + _attention(m, length, h) + _attention(length, length, h)
           + _attention(m, m, h) + _ffn(length, h, f) + _ffn(m, h, f))
  macs += config.num_cross_layers * cross + h * h
  if text_logits:
    macs += length * (h * h + h * config.vocab_size)
  if image_logits:
    macs += m * (h * h + h * config.visual_feat_dim + config.visual_feat_dim * config.num_clusters)
  return 2 * macs


def train_flops(config: ml_collections.ConfigDict, **kwargs) -> int:
  """Forward + backward FLOPs of one example (3x forward)."""
  return 3 * forward_flops(config, **kwargs)
