"""A grid detector for the captioned-scenes world: the demo's stand-in for the papers' Visual Genome detector.

The papers' grid features come from a Faster R-CNN *trained* on objects and attributes, so each cell's
feature says what is in it. This PyTorch convnet is trained once, on rendered scenes of its own stream
(disjoint from the dataset's splits and from the scene recogniser's pool; a different architecture and seed),
to say per cell of the 8x8 grid:

  object                  whether an object covers at least 8% of the cell        cross-entropy
  shape / colour / size   of the object covering most of the cell                cross-entropy, object cells
  coverage                the fraction of the cell that object covers             L1
  centre                  where that object's centre lies, relative to the cell   L1, object cells
  radius                  that object's radius, in cells                          L1, object cells
  background              the background's type (4)                              cross-entropy

Architecture: strided 3x3 convs with batch norm to a stride-4 map (the cell's colours and edges) and a
stride-8 map with dilated context (what object the cell belongs to), both RoI-average-pooled over the 64
grid boxes, then ``fc6`` (linear, ReLU, ``feature_dim`` wide) and linear heads. The backbone stores ``fc6``
or the heads' ``logits`` (``ScenesDetectorBackbone(layer=...)``); either way the heads' reading of a
cluster centroid is the mean reading of its cells, which ``scene_decoder`` draws.

``load_or_train(directory)`` caches the trained weights (and resumes an interrupted training from its last
checkpoint); ``ScenesDetectorBackbone`` is the extraction backbone.
"""

import inspect
import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from bigen_jax import fileio
from bigen_jax.data import records
from bigen_jax.features import backbones
from bigen_jax.worlds.scenes import render
from bigen_jax.worlds.scenes import scene_decoder
from bigen_jax.worlds.scenes import world
from bigen_jax.worlds.scenes.lexicon import BACKGROUNDS, COLOURS, SHAPES, SIZES

IMAGE_SIZE = 128
GRID = records.GRID
CELL = IMAGE_SIZE // GRID
MIN_COVERAGE = 0.08  # a cell belongs to an object when that object covers at least this fraction of it
_STREAM = 0xDE7EC  # the detector's training scenes: a generator stream no split and no recogniser uses
# Per-cell class heads: name, classes (0 = none / the first background type).
CLASS_HEADS = (("object", 2), ("shape", len(SHAPES)), ("colour", len(COLOURS)), ("size", len(SIZES)),
               ("background", len(BACKGROUNDS)))
OBJECT_HEADS = ("shape", "colour", "size")  # read on object cells only
# Per-cell regression heads: name, width.
# The background's colour is not a target: captions never name it, and cell features that carried its gradient
# spent most of a k-means vocabulary on background tones (736 of 1024 clusters, measured with it).
REGRESSION_HEADS = (("coverage", 1), ("centre", 2), ("radius", 1))
CENTRE_RANGE = 3.0  # centre offsets are clipped to +-3 cells, then divided by this
TRAINING_SUFFIX = ".training.pt"  # the checkpoint of an unfinished training, beside the final file


# ----------------------------------------------------------------------------------------------- targets

def cell_targets(scene: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Per-cell training targets of one scene graph (cells row-major, as ``records.grid_boxes``).

  Class targets int64 [64]: object (1 where an object covers at least ``MIN_COVERAGE`` of the cell), its
  shape / colour / size (0 where there is none: masked by ``object``), background; coverage [64], centre
  [64, 2] (object centre minus cell centre, in cells / ``CENTRE_RANGE``), radius [64] (cells), float32.
  """
  size = int(scene["image_size"])
  cell = size / GRID
  cover = np.zeros((len(scene["objects"]), GRID, GRID), np.float32)
  for n, obj in enumerate(scene["objects"]):
    x0, y0, alpha = render._alpha(obj, size)  # pylint: disable=protected-access
    full = np.zeros((size, size), np.float32)
    full[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] = alpha
    cover[n] = full.reshape(GRID, size // GRID, GRID, size // GRID).mean(axis=(1, 3))
  out = {k: np.zeros(GRID * GRID, np.int64) for k in ("shape", "colour", "size")}
  out.update(object=np.zeros(GRID * GRID, np.int64), coverage=np.zeros(GRID * GRID, np.float32),
             centre=np.zeros((GRID * GRID, 2), np.float32), radius=np.zeros(GRID * GRID, np.float32))
  if len(scene["objects"]):
    best = cover.argmax(axis=0).reshape(-1)
    best_cover = cover.max(axis=0).reshape(-1)
    centres = (np.arange(GRID) + 0.5) * cell
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    for c in np.nonzero(best_cover >= MIN_COVERAGE)[0]:
      obj = scene["objects"][best[c]]
      out["shape"][c] = SHAPES.index(obj["shape"])
      out["colour"][c] = COLOURS.index(obj["colour"])
      out["size"][c] = SIZES.index(obj["size"])
      out["coverage"][c] = best_cover[c]
      offset = np.array([obj["x"] - cx.reshape(-1)[c], obj["y"] - cy.reshape(-1)[c]]) / cell
      out["centre"][c] = np.clip(offset, -CENTRE_RANGE, CENTRE_RANGE) / CENTRE_RANGE
      out["radius"][c] = obj["r"] / cell
      out["object"][c] = 1
  out["background"] = np.full(GRID * GRID, BACKGROUNDS.index(scene["background"]["type"]), np.int64)
  return out


def render_pool(num: int, *, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """``num`` training scenes of the detector's own stream: images uint8 [num, 128, 128, 3] and stacked
  ``cell_targets`` [num, 64, ...]."""
  graphs = [world.sample_scene(np.random.default_rng([seed, _STREAM, i])) for i in range(num)]
  images = np.stack([world.render(g) for g in graphs])
  per = [cell_targets(g) for g in graphs]
  return images, {k: np.stack([t[k] for t in per]) for k in per[0]}


# ----------------------------------------------------------------------------------------------- model

def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
  return [nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
          nn.BatchNorm2d(cout), nn.ReLU()]


class SceneDetectorNet(nn.Module):
  """uint8-range images [B, 3, 128, 128] float -> (fc6 cell features [B, 64, feature_dim], head outputs).

  Two levels, both RoI-pooled over the grid boxes: a stride-4 map (colour and edges of the cell) and a
  stride-8 map with dilated context (what the cell's object is, where its centre lies).
  """

  def __init__(self, width: int = 32, feature_dim: int = 64):
    super().__init__()
    self.width, self.feature_dim = width, feature_dim
    self.fine = nn.Sequential(*_conv(3, 24, 2), *_conv(24, width, 2), *_conv(width, width))          # 32x32
    self.context = nn.Sequential(*_conv(width, 2 * width, 2), *_conv(2 * width, 2 * width, 1, 2),
                                 *_conv(2 * width, 2 * width, 1, 4))                                   # 16x16
    self.fc6 = nn.Linear(3 * width, feature_dim)
    self.widths = [n for _, n in CLASS_HEADS] + [n for _, n in REGRESSION_HEADS]
    self.heads = nn.Linear(feature_dim, sum(self.widths))

  def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    fine = self.fine(images / 127.5 - 1.0)
    context = self.context(fine)
    # RoI average pooling of the 64 grid boxes at both levels, cells row-major: [B, 64, 3 * width].
    x = torch.cat([F.adaptive_avg_pool2d(fine, GRID), F.adaptive_avg_pool2d(context, GRID)], 1)
    feats = F.relu(self.fc6(x.flatten(2).transpose(1, 2)))
    parts = torch.split(self.heads(feats), self.widths, dim=-1)
    names = [n for n, _ in CLASS_HEADS] + [n for n, _ in REGRESSION_HEADS]
    return feats, dict(zip(names, parts))


def detector_loss(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, dict[str, float]]:
  """Sum of the per-cell losses: class heads CE (shape, colour, size, centre and radius on object cells
  only, so the many empty cells do not drown them), regressions L1."""
  parts = {}
  obj = targets["object"].float()
  denom = obj.sum().clamp_min(1.0)
  for name, n in CLASS_HEADS:
    ce = F.cross_entropy(outputs[name].reshape(-1, n), targets[name].reshape(-1), reduction="none")
    parts[name] = (ce * obj.reshape(-1)).sum() / denom if name in OBJECT_HEADS else ce.mean()
  parts["coverage"] = (outputs["coverage"][..., 0] - targets["coverage"]).abs().mean()
  parts["centre"] = ((outputs["centre"] - targets["centre"]).abs().sum(-1) * obj).sum() / denom
  parts["radius"] = ((outputs["radius"][..., 0] - targets["radius"]).abs() * obj).sum() / denom
  total = sum(parts.values())
  return total, {k: float(v.detach()) for k, v in parts.items()}


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------------------------- training

def accuracy(net: SceneDetectorNet, images: np.ndarray, targets: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Per-cell accuracy of each class head: on object cells for shape / colour / size, on all cells for
  object (vs none) and background."""
  net.eval()
  with torch.inference_mode():
    outs = [net(_images_to_tensor(images[i:i + 64]))[1] for i in range(0, len(images), 64)]
  pred = {name: torch.cat([o[name] for o in outs]).argmax(-1).numpy() for name, _ in CLASS_HEADS}
  obj = targets["object"] > 0
  report = {f"{name}_on_objects": float((pred[name] == targets[name])[obj].mean()) for name in OBJECT_HEADS}
  report.update({name: float((pred[name] == targets[name]).mean()) for name in ("object", "background")})
  return report


def train_detector(checkpoint: str | None = None, *, steps: int = 1000, seed: int = 1, batch_size: int = 32,
                   learning_rate: float = 3e-3, num_train_scenes: int = 2048, width: int = 32,
                   feature_dim: int = 64, eval_scenes: int = 256, checkpoint_every: int = 100,
                   stop_at: int = 0, log_every: int = 100) -> tuple[SceneDetectorNet, dict[str, Any]]:
  """Trains the detector from scratch (deterministic given the arguments); returns (net, report).

  With ``checkpoint`` (a file path), the weights, Adam state and step are written there every
  ``checkpoint_every`` steps and an interrupted training resumes from it exactly. ``stop_at`` > 0 stops
  after that step (a test
  of the resume); the report then has ``"complete": False``.
  """
  t0 = time.time()
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(seed)
    net = SceneDetectorNet(width=width, feature_dim=feature_dim)
  opt = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
  start, history = 0, []
  ckpt_path = checkpoint
  if ckpt_path and os.path.exists(ckpt_path):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    net.load_state_dict(ckpt["net"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    start, history = int(ckpt["step"]), list(ckpt["history"])
  images, targets = render_pool(num_train_scenes, seed=seed)
  data_seconds = time.time() - t0
  tensors = {k: torch.from_numpy(v) for k, v in targets.items()}
  t1 = time.time()
  end = min(stop_at, steps) if stop_at else steps
  for step in range(start, end):
    # The batch of a step depends on (seed, step) alone, so a resumed run draws the same batches.
    rng = np.random.default_rng([seed, _STREAM, 1, step])
    idx = rng.integers(num_train_scenes, size=batch_size)
    net.train()
    _, outputs = net(_images_to_tensor(images[idx]))
    loss, parts = detector_loss(outputs, {k: v[idx] for k, v in tensors.items()})
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if log_every and (step % log_every == 0 or step == steps - 1):
      history.append({"step": step, "loss": float(loss.detach()), **parts})
    if ckpt_path and ((step + 1) % checkpoint_every == 0 or step + 1 == end):
      _save_atomic({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step + 1, "history": history}, ckpt_path)
  report = {"steps": steps, "seed": seed, "batch_size": batch_size, "learning_rate": learning_rate,
            "num_train_scenes": num_train_scenes, "width": width, "feature_dim": feature_dim,
            "resumed_from": start, "complete": end == steps, "data_seconds": round(data_seconds, 2),
            "train_seconds": round(time.time() - t1, 2), "history": history}
  if eval_scenes and end == steps:
    held_images, held_targets = render_pool(eval_scenes, seed=seed + 1000)
    report["heldout"] = accuracy(net, held_images, held_targets)
  net.eval()
  return net, report


def _save_atomic(obj: Any, path: str) -> None:
  with fileio.open_atomic(path) as f:
    torch.save(obj, f)


def save_detector(path: str, net: SceneDetectorNet, report: Mapping[str, Any]) -> None:
  """One file: the state dict plus the architecture and the training report (atomic write); and beside it
  ``<path>.heads.npz``, the linear heads as numpy, which ``scene_decoder`` reads (no torch)."""
  _save_atomic({"state_dict": net.state_dict(), "width": net.width,
                "feature_dim": net.feature_dim, "report": json.dumps(dict(report))}, path)
  save_heads(path + scene_decoder.HEADS_SUFFIX, net)


def save_heads(path: str, net: SceneDetectorNet) -> None:
  """The heads on fc6 (weight [O, D], bias [O]), their names and widths and the targets' scales, as .npz."""
  names = [n for n, _ in CLASS_HEADS] + [n for n, _ in REGRESSION_HEADS]
  with fileio.open_atomic(path) as f:
    np.savez(f, weight=net.heads.weight.detach().numpy(), bias=net.heads.bias.detach().numpy(),
             names=np.array(names), widths=np.array(net.widths), cell=np.float32(CELL),
             centre_range=np.float32(CENTRE_RANGE))


def load_detector(path: str) -> tuple[SceneDetectorNet, dict[str, Any]]:
  """(net in eval mode, report) from ``save_detector``; errors name the file."""
  if not os.path.isfile(path):
    raise backbones.WeightsError(f"scenes detector file {path} does not exist (train it with "
                                 "bigen_jax.worlds.scenes.detector.load_or_train)")
  try:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    net = SceneDetectorNet(width=int(blob["width"]), feature_dim=int(blob["feature_dim"]))
  except Exception as e:  # pylint: disable=broad-except
    raise backbones.WeightsError(f"{path} is not a scenes detector file ({type(e).__name__}: {e})") from e
  backbones.load_weights(net, blob["state_dict"], path)
  return net.eval(), json.loads(blob["report"])


def detector_path(directory: str, **train_kwargs) -> str:
  """Where ``load_or_train`` keeps the detector trained with these arguments (defaults filled in)."""
  args = inspect.signature(train_detector).bind(None, **train_kwargs)
  args.apply_defaults()
  skip = ("checkpoint", "eval_scenes", "checkpoint_every", "stop_at", "log_every")
  key = "_".join(f"{k}{v}" for k, v in sorted(args.arguments.items()) if k not in skip)
  return os.path.join(directory, f"scenes_detector_{key}.pt")


def load_or_train(directory: str, **train_kwargs) -> tuple[str, dict[str, Any]]:
  """(path, report) of the cached detector for these arguments, trained on first use (an interrupted
  training resumes from ``<path>.training.pt``); path is "" while the training is incomplete (``stop_at``)."""
  path = detector_path(directory, **train_kwargs)
  if os.path.exists(path):
    return path, load_detector(path)[1]
  checkpoint = path + TRAINING_SUFFIX
  net, report = train_detector(checkpoint, **train_kwargs)
  if not report["complete"]:
    return "", report
  save_detector(path, net, report)
  os.remove(checkpoint)
  return path, report


# ----------------------------------------------------------------------------------------------- backbone

LAYERS = ("fc6", "logits", "gated_logits")
EMPTY_LOGIT = 5.0  # the canonical empty cell's class logits: +-5 (probability 0.99995 on its class)


def logits(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
  """The heads' raw outputs as one vector per cell [B, 64, 27], in head order (class logits, then the
  regressions): the detector's own reading of each cell, a linear map of ``fc6``."""
  return torch.cat([outputs[name] for name, _ in CLASS_HEADS + REGRESSION_HEADS], -1)


def empty_cell_logits(background: torch.Tensor) -> torch.Tensor:
  """The canonical empty cell of each background type (int [...]): [..., 27] logits that say "no object"
  and that type at +-``EMPTY_LOGIT``; the object heads and the regressions are 0."""
  parts = []
  for name, width in CLASS_HEADS + REGRESSION_HEADS:
    part = torch.zeros(background.shape + (width,))
    if name == "object":
      part[..., 0], part[..., 1] = EMPTY_LOGIT, -EMPTY_LOGIT
    elif name == "background":
      part = EMPTY_LOGIT * (2 * F.one_hot(background, width).float() - 1)
    parts.append(part)
  return torch.cat(parts, -1)


def gated_logits(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
  """``logits`` where the object head sees an object (P > 0.5); every other cell becomes the canonical empty
  cell of its background type (``empty_cell_logits``) [B, 64, 27].

  82% of the demo world's cells are empty, and in ``logits`` their texture noise is a continuum that k-means
  splits by mass (722 of 1024 clusters, 5.1 nats of cluster entropy given the background type, none of it
  named by a caption). Here empty cells take exactly one vector per background type, which the vocabulary
  keeps as one code each (``bigen_jax.data.vocab.build_vocab(exact_min_count=...)``).
  """
  cells = logits(outputs)
  empty = outputs["object"].argmax(-1) == 0
  canonical = empty_cell_logits(outputs["background"].argmax(-1)).to(cells)
  return torch.where(empty[..., None], canonical, cells)


class ScenesDetectorBackbone(backbones.Backbone):
  """The trained detector's cell features: ``layer`` "fc6" (the RoI-pooled features, D = its feature_dim,
  64 by default), "logits" (its heads' outputs, D = 27) or "gated_logits" (the logits of object cells, one
  canonical vector per background type for empty cells, D = 27)."""
  name = "scenes_detector"

  def __init__(self, *, weights: str | None = None, image_size: int = IMAGE_SIZE, layer: str = "fc6",
               device: str = "cpu", **unused):
    super().__init__(device)
    if not weights:
      raise backbones.WeightsError("--backbone scenes_detector needs --weights: the file that "
                                   "bigen_jax.worlds.scenes.detector.load_or_train writes")
    if image_size != IMAGE_SIZE:
      raise ValueError(f"the scenes detector reads {IMAGE_SIZE}-px images, got image_size={image_size}")
    if layer not in LAYERS:
      raise ValueError(f"scenes_detector layer must be one of {LAYERS}, got {layer!r}")
    self.net, self.report = load_detector(weights)
    self.net.to(self.device)
    self.weights = weights
    self.weights_sha256 = records.sha256_file(weights)
    self.image_size = IMAGE_SIZE
    self.layer = layer
    self.feature_dim = self.net.feature_dim if layer == "fc6" else sum(self.net.widths)

  def config(self) -> dict[str, Any]:
    cfg = super().config()
    cfg.update(weights=os.path.basename(self.weights), weights_sha256=self.weights_sha256, layer=self.layer)
    return cfg

  def features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
    xs = []
    for im in images:
      x = torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1).float()
      if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)[0]
      xs.append(x)
    feats, outputs = self.net(torch.stack(xs).to(self.device))
    if self.layer == "fc6":
      return feats
    return logits(outputs) if self.layer == "logits" else gated_logits(outputs)
