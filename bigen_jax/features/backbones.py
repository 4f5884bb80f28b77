"""Grid-feature backbones: a batch of uint8 RGB images -> ``[B, 64, D]`` float32 features of the 8x8 grid.

Cells are row-major, cell (i, j) covering ``records.grid_boxes()[i * 8 + j]``.

  demo    fixed hand-made features of each cell (no weights), D = 64, for the 128-px captioned-scenes world
  scenes_detector  a convnet trained on rendered scenes to tell what each cell holds (the captioned-scenes
          world's ``bigen_jax.worlds.scenes.detector``):
          the captioned-scenes world's stand-in for the papers' trained detector, D = 64
  resnet  torchvision ResNet-50 C5 (layer4) average-pooled to 8x8, D = 2048, short side 448
  frcnn   torchvision Faster R-CNN R50-FPN: RoIAlign of the 64 cell boxes + box head (fc7, or fc6),
          D = the head width (1024 in torchvision, taken from the weights file if it differs), short side 800
resnet and frcnn resize the short side to ``short_side`` unless the long side would exceed ``max_side`` (1333),
in which case the long side is ``max_side``: a 20 x 4000 image must not become 224 x 44800.

``build_backbone(name, weights=..., short_side=..., device=...)`` is the entry point. Without a weights file
``resnet`` and ``frcnn`` are randomly initialised (seeded), which is only good for testing.
"""

import math
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # pylint: disable=g-import-not-at-top
import torch  # pylint: disable=g-import-not-at-top
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

from bigen_jax import errors  # pylint: disable=g-import-not-at-top
from bigen_jax.data import records  # pylint: disable=g-import-not-at-top

try:  # No compilation: torchvision ops must not fall back to inductor (hundreds of MB under /tmp).
  torch._dynamo.config.disable = True  # pylint: disable=protected-access
except Exception:  # pylint: disable=broad-except
  pass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(errors.UserError):
  """A weights file that cannot be loaded into a backbone; the message names the file and the keys."""


def as_image_list(images) -> list[np.ndarray]:
  """Validates a batch: ``[B, H, W, 3]`` uint8 or a list of ``[H, W, 3]`` uint8 arrays (sizes may differ)."""
  out = []
  for n, im in enumerate(list(images)):
    im = np.asarray(im)
    if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
      raise ValueError(f"image {n} of the batch is {im.dtype} {im.shape}, expected uint8 [H, W, 3] RGB")
    out.append(im)
  if not out:
    raise ValueError("empty batch of images")
  return out


def _to_float(im: np.ndarray, device) -> torch.Tensor:
  """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
  return torch.from_numpy(np.array(im, copy=True)).to(device).permute(2, 0, 1).float().div_(255.0)


def _group_by_shape(images: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
  """Batch positions grouped by image shape, so that features never depend on other images' padding."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for n, im in enumerate(images):
    groups.setdefault(im.shape, []).append(n)
  return groups


# ----------------------------------------------------------------------------------------------- weights


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
  """Loads a torch state dict, unwrapping ``{"model": ...}`` / ``{"state_dict": ...}`` and ``module.`` prefixes."""
  if not os.path.isfile(path):
    raise WeightsError(f"weights file {path} does not exist")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f"cannot read weights file {path} as a torch state dict ({type(e).__name__}: {e}); "
                       "save it with torch.save(model.state_dict(), path)") from e
  for wrapper in ("model", "state_dict"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
    raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
  out = {}
  for k, v in obj.items():
    while k.startswith("module."):
      k = k[len("module."):]
    out[k] = v
  return out


def _few(keys: Sequence[Any], n: int = 5) -> str:
  keys = list(keys)
  more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
  return ", ".join(map(str, keys[:n])) + more


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str,
                 ignore_prefixes: Sequence[str] = ()) -> None:
  """Strict load, except for parts the features never use (``ignore_prefixes``) and BN step counters."""

  def used(k):
    return not k.endswith("num_batches_tracked") and not any(k.startswith(p) for p in ignore_prefixes)

  own = {k: v for k, v in model.state_dict().items() if used(k)}
  state = {k: v for k, v in state.items() if used(k)}
  missing = [k for k in own if k not in state]
  unexpected = [k for k in state if k not in own]
  bad_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
               for k in state if k in own and state[k].shape != own[k].shape]
  if missing or unexpected or bad_shape:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if bad_shape:
      parts.append(f"{len(bad_shape)} shape mismatch(es) (file vs model): {_few(bad_shape)}")
    raise WeightsError(f"weights file {path} does not fit the {type(model).__name__} model: " + "; ".join(parts))
  model.load_state_dict(state, strict=False)


def _sha256(path: str) -> str:
  return records.sha256_file(path)


# ----------------------------------------------------------------------------------------------- backbones


class Backbone:
  """Base: ``__call__(images) -> np.float32 [B, 64, feature_dim]``; ``config()`` is recorded in the manifest."""
  name = ""
  feature_dim = 0
  image_size = 0  # demo: the square size images are resized to; resnet/frcnn: the short side

  def __init__(self, device: str = "cpu"):
    self.device = torch.device(device)

  def config(self) -> dict[str, Any]:
    return {"name": self.name, "feature_dim": self.feature_dim, "image_size": self.image_size}

  def features(self, images: list[np.ndarray]) -> torch.Tensor:
    raise NotImplementedError

  def __call__(self, images) -> np.ndarray:
    images = as_image_list(images)
    with torch.inference_mode():
      out = self.features(images)
    out = out.float().cpu().numpy()
    assert out.shape == (len(images), records.NUM_CELLS, self.feature_dim), out.shape
    return out


class _TorchvisionBackbone(Backbone):
  """Shared weights handling of ``resnet`` and ``frcnn``."""
  ignore_prefixes: tuple[str, ...] = ()

  def __init__(self, *, weights: str | None, seed: int, device: str):
    super().__init__(device)
    self.weights = weights
    state = read_state_dict(weights) if weights else None
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(seed)
      self.model = self.build(state)
    if state is not None:
      load_weights(self.model, state, weights, self.ignore_prefixes)
      self.weights_sha256 = _sha256(weights)
    else:
      self.weights_sha256 = None
      warnings.warn(f"backbone {self.name!r} has no --weights: randomly initialised (seed {seed}); "
                    "its features are only good for testing", stacklevel=3)
    self.seed = seed
    self.model.eval().to(self.device)

  def build(self, state: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    raise NotImplementedError

  def config(self) -> dict[str, Any]:
    cfg = super().config()
    cfg.update(weights=os.path.basename(self.weights) if self.weights else None,
               weights_sha256=self.weights_sha256, seed=None if self.weights else self.seed)
    return cfg


class ResNetBackbone(_TorchvisionBackbone):
  """ResNet-50 layer4 output, adaptive-average-pooled to 8x8: D = 2048."""
  name = "resnet"
  feature_dim = 2048
  ignore_prefixes = ("fc.",)  # the classifier is never run (and its size varies)

  def __init__(self, *, weights=None, short_side=448, max_side=1333, seed=0, device="cpu"):
    if short_side < 1 or max_side < 1:
      raise ValueError(f"resnet short_side and max_side must be positive, got {short_side}, {max_side}")
    self.image_size = int(short_side)
    self.max_side = int(max_side)
    super().__init__(weights=weights, seed=seed, device=device)

  def config(self):
    cfg = super().config()
    cfg.update(max_side=self.max_side)
    return cfg

  def build(self, state):
    import torchvision  # pylint: disable=g-import-not-at-top
    return torchvision.models.resnet50(weights=None)

  def preprocess(self, im: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalised float [3, H', W'] with short side ``image_size``, or long side ``max_side``
    if that is smaller (bilinear, antialiased)."""
    x = _to_float(im, self.device)
    h, w = x.shape[-2:]
    s = min(self.image_size / min(h, w), self.max_side / max(h, w))
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if size != (h, w):
      x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (x - mean) / std

  def layer4(self, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] normalised -> C5 [B, 2048, H/32, W/32]."""
    m = self.model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))

  def features(self, images):
    out = torch.empty(len(images), records.NUM_CELLS, self.feature_dim, device=self.device)
    for idx in _group_by_shape(images).values():
      x = torch.stack([self.preprocess(images[n]) for n in idx])
      c5 = F.adaptive_avg_pool2d(self.layer4(x), records.GRID)  # [b, 2048, 8, 8]
      out[idx] = c5.flatten(2).transpose(1, 2)
    return out


class FasterRCNNBackbone(_TorchvisionBackbone):
  """Faster R-CNN R50-FPN: the 64 cell boxes through MultiScaleRoIAlign and the two-layer box head."""
  name = "frcnn"
  # The features never use the proposal network or the class/box predictor (whose size is the class count).
  ignore_prefixes = ("rpn.", "roi_heads.box_predictor.")

  def __init__(self, *, weights=None, short_side=800, max_side=1333, layer="fc7", seed=0, device="cpu"):
    if layer not in ("fc6", "fc7"):
      raise ValueError(f"frcnn layer must be 'fc6' or 'fc7', got {layer!r}")
    self.image_size = int(short_side)
    self.max_side = int(max_side)
    self.layer = layer
    super().__init__(weights=weights, seed=seed, device=device)
    self.feature_dim = self.model.roi_heads.box_head.fc6.out_features

  def build(self, state):
    import torchvision  # pylint: disable=g-import-not-at-top
    from torchvision.models.detection.faster_rcnn import TwoMLPHead  # pylint: disable=g-import-not-at-top
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=self.image_size, max_size=self.max_side)
    fc6 = (state or {}).get("roi_heads.box_head.fc6.weight")
    head = model.roi_heads.box_head
    if fc6 is not None and fc6.shape[0] != head.fc6.out_features:  # e.g. a 2048-wide Visual Genome head
      model.roi_heads.box_head = TwoMLPHead(head.fc6.in_features, fc6.shape[0])
    return model

  def config(self):
    cfg = super().config()
    cfg.update(layer=self.layer, max_side=self.max_side)
    return cfg

  def features(self, images):
    m = self.model
    out = torch.empty(len(images), records.NUM_CELLS, self.feature_dim, device=self.device)
    grid = torch.from_numpy(records.grid_boxes()).to(self.device)
    for idx in _group_by_shape(images).values():
      batch, _ = m.transform([_to_float(images[n], self.device) for n in idx])
      feats = m.backbone(batch.tensors)
      boxes = [grid * torch.tensor([w, h, w, h], dtype=grid.dtype, device=self.device)
               for h, w in batch.image_sizes]  # cell boxes in resized-image pixels (before padding)
      x = m.roi_heads.box_roi_pool(feats, boxes, batch.image_sizes).flatten(1)  # [b*64, 256*7*7]
      head = m.roi_heads.box_head
      x = F.relu(head.fc6(x))
      if self.layer == "fc7":
        x = F.relu(head.fc7(x))
      out[idx] = x.reshape(len(idx), records.NUM_CELLS, -1)
    return out


# Fixed affine standardisation of the demo features (measured on synthetic shape scenes, rounded).
_DEMO_GROUPS = (  # name, width
    ("rgb4x4", 48), ("rgb_std", 3), ("grad_xy", 2), ("grad_diag", 1), ("edge_density", 1),
    ("hue_xy", 2), ("sat_val_mean", 2), ("sat_val_std", 2), ("lum_mean", 1), ("lum_range", 1),
    ("coverage", 1))
_DEMO_NORM = {  # name: (offset, scale) -> (x - offset) / scale
    "rgb4x4": (0.75, 0.2), "rgb_std": (0.04, 0.09), "grad_xy": (0.003, 0.008), "grad_diag": (0.005, 0.012),
    "edge_density": (0.01, 0.02), "hue_xy": (0.0, 0.19), "sat_val_mean": (0.55, 0.35),
    "sat_val_std": (0.035, 0.09), "lum_mean": (0.75, 0.15), "lum_range": (0.09, 0.18), "coverage": (0.06, 0.14),
}


class DemoBackbone(Backbone):
  """Fixed per-cell statistics, D = 64, for the synthetic 128-px world (deterministic, no weights).

  Per cell: the cell downsampled to 4x4 RGB (48), colour std (3), mean |d/dx|, |d/dy| (2) and diagonal (1)
  luminance gradients, edge density (1), chroma-weighted hue vector (2), mean and std of HSV saturation and
  value (4), mean luminance (1), luminance range (1), fraction of pixels far from the cell's median colour (1).
  Images are resized to ``image_size`` x ``image_size`` first; values are roughly zero-mean, unit-scale.
  """
  name = "demo"
  feature_dim = 64

  def __init__(self, *, image_size=128, device="cpu", **unused):
    super().__init__(device)
    if image_size % (4 * records.GRID):
      raise ValueError(f"demo backbone image_size must be a multiple of {4 * records.GRID}, got {image_size}")
    self.image_size = int(image_size)
    self.offset = torch.cat([torch.full((w,), _DEMO_NORM[n][0]) for n, w in _DEMO_GROUPS]).to(self.device)
    self.scale = torch.cat([torch.full((w,), _DEMO_NORM[n][1]) for n, w in _DEMO_GROUPS]).to(self.device)

  def raw_features(self, x: torch.Tensor) -> torch.Tensor:
    """float [B, 3, S, S] in [0, 1] -> unnormalised [B, 64, 64]."""
    b, _, s, _ = x.shape
    c = s // records.GRID
    p = x.reshape(b, 3, records.GRID, c, records.GRID, c).permute(0, 2, 4, 1, 3, 5)
    p = p.reshape(b * records.NUM_CELLS, 3, c, c)  # cells, row-major
    n = p.shape[0]
    rgb4 = F.avg_pool2d(p, c // 4).reshape(n, 48)
    flat = p.reshape(n, 3, c * c)
    rgb_std = flat.std(-1, unbiased=False)
    lum = 0.299 * p[:, 0] + 0.587 * p[:, 1] + 0.114 * p[:, 2]  # [n, c, c]
    dx = (lum[:, :, 1:] - lum[:, :, :-1]).abs()
    dy = (lum[:, 1:, :] - lum[:, :-1, :]).abs()
    dd = (lum[:, 1:, 1:] - lum[:, :-1, :-1]).abs()
    grad = torch.stack([dx.mean((1, 2)), dy.mean((1, 2))], -1)
    edges = 0.5 * ((dx > 0.1).float().mean((1, 2)) + (dy > 0.1).float().mean((1, 2)))
    mx, arg = flat.max(1)
    mn = flat.min(1).values
    chroma = mx - mn
    safe = chroma.clamp_min(1e-6)
    r, g, bl = flat[:, 0], flat[:, 1], flat[:, 2]
    hue = torch.where(arg == 0, torch.remainder((g - bl) / safe, 6.0),
                      torch.where(arg == 1, (bl - r) / safe + 2.0, (r - g) / safe + 4.0)) * (math.pi / 3)
    hue_xy = torch.stack([(chroma * torch.cos(hue)).mean(-1), (chroma * torch.sin(hue)).mean(-1)], -1)
    sat = chroma / mx.clamp_min(1e-6)
    sv = torch.stack([sat, mx], 1)  # [n, 2, c*c]
    lum_f = lum.reshape(n, -1)
    median = flat.median(-1).values  # [n, 3]
    coverage = ((flat - median[..., None]).abs().sum(1) > 0.15).float().mean(-1)
    feats = torch.cat([
        rgb4, rgb_std, grad, dd.mean((1, 2))[:, None], edges[:, None], hue_xy, sv.mean(-1),
        sv.std(-1, unbiased=False), lum_f.mean(-1, keepdim=True),
        (lum_f.max(-1).values - lum_f.min(-1).values)[:, None], coverage[:, None]], -1)
    return feats.reshape(b, records.NUM_CELLS, self.feature_dim)

  def features(self, images):
    s = self.image_size
    xs = []
    for im in images:
      x = _to_float(im, self.device)
      if x.shape[-2:] != (s, s):
        x = F.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
      xs.append(x)
    return (self.raw_features(torch.stack(xs)) - self.offset) / self.scale


def _scenes_detector(**kwargs) -> Backbone:
  from bigen_jax.worlds.scenes import detector  # pylint: disable=g-import-not-at-top  (imports this module)
  return detector.ScenesDetectorBackbone(**kwargs)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "demo": DemoBackbone, "resnet": ResNetBackbone, "frcnn": FasterRCNNBackbone,
    "scenes_detector": _scenes_detector}


def build_backbone(name: str, *, weights: str | None = None, short_side: int | None = None,
                   device: str = "cpu", seed: int = 0, **kwargs) -> Backbone:
  """Builds a backbone by name. ``short_side`` is the resize target (demo: the square image size)."""
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; valid names: {sorted(BACKBONES)}")
  if name == "demo":
    if weights:
      raise ValueError("the demo backbone is fixed and takes no weights file")
    if short_side:
      kwargs["image_size"] = short_side
    return DemoBackbone(device=device, **kwargs)
  if name == "scenes_detector":
    if short_side:
      kwargs["image_size"] = short_side
    return BACKBONES[name](weights=weights, device=device, **kwargs)
  if short_side:
    kwargs["short_side"] = short_side
  return BACKBONES[name](weights=weights, seed=seed, device=device, **kwargs)
