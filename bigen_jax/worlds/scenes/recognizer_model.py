"""A small CenterNet-style convnet that reads a captioned-scenes image back into its scene graph.

The 128x128 image is cut into a 16x16 grid of 8-pixel cells. Per cell the network predicts an objectness
logit (is an object's centre in this cell), shape (7), colour (8) and size (2) logits and the sub-cell
offset of the centre; a global pool predicts the background type (4). Objects of a scene keep a 2-pixel gap
between their boxes and are at least 18 pixels wide, so two centres never fall in the same or in adjacent
cells along both axes and a 3x3 local-maximum test separates them.

Targets (``scene_targets``), loss (``recognizer_loss``) and decoding (``decode``) are pure functions over
numpy / jax arrays; the module itself is plain flax linen.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigen_jax.worlds.scenes.lexicon import BACKGROUNDS, COLOURS, SHAPES, SIZES

IMAGE_SIZE = 128
CELL = 8
GRID = IMAGE_SIZE // CELL
# Per-cell output channels: shape, colour, size logits then two offset logits.
ATTRS = (("shape", len(SHAPES)), ("colour", len(COLOURS)), ("size", len(SIZES)), ("offset", 2))
HEAT_SIGMA = 1.0  # cells; width of the objectness target around each centre cell
# Radius (pixels) written for a decoded object: the middle of its size's range (``world.SIZE_RANGE``).
SIZE_RADIUS = {"small": 10.5, "large": 19.5}


class SceneRecognizer(nn.Module):
  """uint8 images [N, 128, 128, 3] -> {"heat" [N, G, G], "shape" [N, G, G, 7], "colour" [N, G, G, 8],
  "size" [N, G, G, 2], "offset" [N, G, G, 2], "background" [N, 4]}, all logits, float32 (G = 16), and
  "features" [N, 96]: the pooled image features (FID in the recogniser's feature space)."""
  stem_width: int = 32       # 4x4 patches (stride 4) then one 3x3 conv at 32x32
  width: int = 64            # one stride-2 3x3 conv to the 16x16 grid, then the context convs
  context_layers: int = 3    # residual 3x3 convs at stride 8, dilations 1, 2, 1...: receptive field ~84 px

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = nn.relu(nn.Conv(self.stem_width, (4, 4), strides=4, padding="VALID", name="stem")(x))
    x = nn.relu(nn.Conv(self.stem_width, (3, 3), name="conv")(x))
    fine = x.mean(axis=(1, 2))  # the background's texture is finer than the 8-pixel grid
    x = nn.Conv(self.width, (3, 3), strides=2, name="down")(x)
    for i in range(self.context_layers):
      d = 2 if i % 2 else 1
      h = nn.relu(nn.GroupNorm(num_groups=8, name=f"norm{i}")(x))
      x = x + nn.Conv(self.width, (3, 3), kernel_dilation=d, name=f"context{i}")(h)
    x = nn.relu(nn.GroupNorm(num_groups=8, name="norm_out")(x))
    features = jnp.concatenate([fine, x.mean(axis=(1, 2))], axis=-1)
    pooled = nn.relu(nn.Dense(self.width, name="bg_hidden")(features))
    background = nn.Dense(len(BACKGROUNDS), name="background")(pooled)
    h = nn.relu(nn.Conv(self.width, (1, 1), name="head")(x))
    # Bias -2.2: every cell starts at objectness ~0.1, which keeps the focal loss stable at the start.
    heat = nn.Conv(1, (1, 1), bias_init=nn.initializers.constant(-2.2), name="heat")(h)[..., 0]
    attrs = nn.Conv(sum(n for _, n in ATTRS), (1, 1), name="attrs")(h)
    out = {"heat": heat, "background": background, "features": features}
    start = 0
    for name, n in ATTRS:
      out[name] = attrs[..., start:start + n]
      start += n
    return out


def scene_targets(scene: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Training target of one scene graph: heat [G, G] float32 (1 at centre cells, a Gaussian of
  ``HEAT_SIGMA`` cells around them), mask [G, G] float32 (1 at centre cells), shape/colour/size [G, G]
  int32, offset [G, G, 2] float32 (centre within its cell, in [0, 1)), background () int32."""
  heat = np.zeros((GRID, GRID), np.float32)
  mask = np.zeros((GRID, GRID), np.float32)
  labels = {k: np.zeros((GRID, GRID), np.int32) for k in ("shape", "colour", "size")}
  offset = np.zeros((GRID, GRID, 2), np.float32)
  gy, gx = np.mgrid[0:GRID, 0:GRID]
  for obj in scene["objects"]:
    fx, fy = obj["x"] / CELL, obj["y"] / CELL
    cx, cy = min(int(fx), GRID - 1), min(int(fy), GRID - 1)
    heat = np.maximum(heat, np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * HEAT_SIGMA ** 2)))
    mask[cy, cx] = 1.0
    offset[cy, cx] = (fx - cx, fy - cy)
    for key, vocab in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
      labels[key][cy, cx] = vocab.index(obj[key])
  return {"heat": heat.astype(np.float32), "mask": mask, **labels, "offset": offset,
          "background": np.int32(BACKGROUNDS.index(scene["background"]["type"]))}


def flip_scene(scene: Mapping[str, Any]) -> dict[str, Any]:
  """The scene mirrored left-right (every shape is symmetric about its vertical axis): x -> size - x."""
  size = scene["image_size"]
  objects = [dict(o, x=size - o["x"]) for o in scene["objects"]]
  return dict(scene, objects=objects)


def _focal(logits: jax.Array, heat: jax.Array, mask: jax.Array, alpha: float = 2.0, beta: float = 4.0
           ) -> jax.Array:
  """CenterNet's penalty-reduced focal loss summed over cells, [N, G, G] -> [N]."""
  p = jax.nn.sigmoid(logits)
  log_p, log_not_p = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  pos = -mask * (1 - p) ** alpha * log_p
  neg = -(1 - mask) * (1 - heat) ** beta * p ** alpha * log_not_p
  return (pos + neg).sum(axis=(1, 2))


def _masked_ce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Cross-entropy at centre cells summed per image: logits [N, G, G, K], labels/mask [N, G, G] -> [N]."""
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return (nll * mask).sum(axis=(1, 2))


def recognizer_loss(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array]
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Batch loss (scalar) and its parts. Per-object terms are divided by the batch's number of objects."""
  mask = targets["mask"]
  num = jnp.maximum(mask.sum(), 1.0)
  parts = {"heat": _focal(outputs["heat"], targets["heat"], mask).sum() / num}
  for name in ("shape", "colour", "size"):
    parts[name] = _masked_ce(outputs[name], targets[name], mask).sum() / num
  offset_err = jnp.abs(jax.nn.sigmoid(outputs["offset"]) - targets["offset"]).sum(-1)
  parts["offset"] = (offset_err * mask).sum() / num
  bg_logp = jax.nn.log_softmax(outputs["background"])
  parts["background"] = -jnp.take_along_axis(bg_logp, targets["background"][:, None], axis=-1).mean()
  return sum(parts.values()), parts


def probabilities(outputs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Logits -> probabilities: heat [N, G, G] sigmoid, offset [N, G, G, 2] sigmoid, the rest softmax."""
  out = {"heat": jax.nn.sigmoid(outputs["heat"]), "offset": jax.nn.sigmoid(outputs["offset"])}
  for name in ("shape", "colour", "size", "background"):
    out[name] = jax.nn.softmax(outputs[name], axis=-1)
  return out


def local_maxima(heat: np.ndarray) -> np.ndarray:
  """Cells that are the maximum of their 3x3 neighbourhood (first one on ties), heat [..., G, G] -> bool."""
  padded = np.pad(heat, [(0, 0)] * (heat.ndim - 2) + [(1, 1), (1, 1)], constant_values=-np.inf)
  g0, g1 = heat.shape[-2:]
  keep = np.ones(heat.shape, bool)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      if dy == 0 and dx == 0:
        continue
      other = padded[..., 1 + dy:1 + dy + g0, 1 + dx:1 + dx + g1]
      # A neighbour earlier in raster order wins a tie, so a plateau keeps exactly one cell.
      keep &= (heat > other) if (dy, dx) < (0, 0) else (heat >= other)
  return keep


def decode(probs: Mapping[str, np.ndarray], *, threshold: float = 0.3, relation_margin: float = 8.0
           ) -> list[dict[str, Any]]:
  """Per-image probabilities (``probabilities``, numpy, batched) -> scene dicts as ``check_claims`` reads
  them: {"image_size", "relation_margin", "background": {"type", "p"}, "objects": [{"shape", "colour",
  "size", "x", "y", "r", "score"}]}, objects in raster order of their centre cells."""
  heat = np.asarray(probs["heat"])
  peaks = local_maxima(heat) & (heat > threshold)
  scenes = []
  for n in range(heat.shape[0]):
    objects = []
    for cy, cx in zip(*np.nonzero(peaks[n])):
      ox, oy = probs["offset"][n, cy, cx]
      obj = {k: vocab[int(np.argmax(probs[k][n, cy, cx]))]
             for k, vocab in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES))}
      obj.update(x=float((cx + ox) * CELL), y=float((cy + oy) * CELL), r=SIZE_RADIUS[obj["size"]],
                 score=float(heat[n, cy, cx]))
      objects.append(obj)
    bg = np.asarray(probs["background"][n])
    scenes.append({"image_size": IMAGE_SIZE, "relation_margin": float(relation_margin),
                   "background": {"type": BACKGROUNDS[int(np.argmax(bg))], "p": float(bg.max())},
                   "objects": objects})
  return scenes


def target_probabilities(targets: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Batched targets -> the probabilities a perfect recogniser would give (for testing ``decode``)."""
  out = {"heat": targets["heat"], "offset": targets["offset"]}
  for name, n in (("shape", len(SHAPES)), ("colour", len(COLOURS)), ("size", len(SIZES)),
                  ("background", len(BACKGROUNDS))):
    out[name] = np.eye(n, dtype=np.float32)[targets[name]]
  return out
