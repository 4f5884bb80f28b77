"""Fréchet Inception Distance: Gaussian statistics of features and the Fréchet distance between them.

FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) over pooled Inception-v3 features (2048-d) of two image
sets, in float64. Published FID uses pytorch-fid's FID Inception (``inception.InceptionV3(variant="fid")``);
the distance under torchvision's Inception is another number, named ``fid_torchvision`` (``METRIC_NAMES``).
``(S1 S2)^(1/2)`` uses ``scipy.linalg.sqrtm`` when scipy is installed (as the standard FID code does, with the
same fallbacks: an ``eps`` ridge when the product is singular, the real part when the imaginary part is
numerical noise), else the trace via eigenvalues of ``S1^(1/2) S2 S1^(1/2)``.
"""

import functools
from typing import Any, Callable, Iterable

import jax
import numpy as np

from bigen_jax.data import batching
from bigen_jax.models import inception

FeaturesFn = Callable[[np.ndarray], Any]
# The metric name of each Inception variant's distance: only the FID Inception's is comparable with published
# FID; torchvision's network (other pools, other weights) gives another number.
METRIC_NAMES = {"fid": "fid", "torchvision": "fid_torchvision"}


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """features [N, D] -> (mean [D], unbiased covariance [D, D]) in float64, as ``np.cov(rowvar=False)``."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"statistics need features [N >= 2, D], got shape {features.shape}")
  mu = features.mean(axis=0)
  centred = features - mu
  return mu, centred.T @ centred / (features.shape[0] - 1)


def _sqrtm_scipy(a: np.ndarray) -> np.ndarray:
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  return scipy.linalg.sqrtm(a)


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float, atol: float) -> float:
  """tr((S1 S2)^(1/2)) with scipy's Schur-based sqrtm; retries with ``eps`` on both diagonals if singular."""
  covmean = _sqrtm_scipy(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    ridge = eps * np.eye(sigma1.shape[0])
    covmean = _sqrtm_scipy((sigma1 + ridge) @ (sigma2 + ridge))
  if np.iscomplexobj(covmean):
    imaginary = np.max(np.abs(np.diagonal(covmean).imag))
    if imaginary > atol:
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of {imaginary:.3g} on its diagonal "
                       f"(> {atol}): the covariances are not positive semi-definite or too ill-conditioned; "
                       "use more samples than feature dimensions or a larger eps")
    covmean = covmean.real
  return float(np.trace(covmean))


def _check_psd(w: np.ndarray, what: str, atol: float) -> None:
  """Raises if eigenvalues w of a symmetric matrix go below zero by more than ``atol`` x the largest one."""
  if w.size and w.min() < -atol * max(np.abs(w).max(), 1.0):
    raise ValueError(f"{what} has a negative eigenvalue {w.min():.3g}: the covariances are not positive "
                     "semi-definite")


def _psd_sqrt(a: np.ndarray, atol: float) -> np.ndarray:
  """The symmetric square root of a symmetric PSD matrix (negative rounding errors clipped to zero)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  _check_psd(w, "sigma1", atol)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray, atol: float) -> float:
  """tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix with the
  eigenvalues of S1 S2; eigenvalues below zero by more than ``atol`` x the largest one raise."""
  root = _psd_sqrt(sigma1, atol)
  middle = root @ sigma2 @ root
  w = np.linalg.eigvalsh((middle + middle.T) / 2)
  _check_psd(w, "S1^(1/2) S2 S1^(1/2)", atol)
  return float(np.sum(np.sqrt(np.clip(w, 0, None))))


def _has_scipy() -> bool:
  try:
    import scipy.linalg  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     eps: float = 1e-6, atol: float = 1e-3, method: str = "auto") -> float:
  """Fréchet distance between N(mu1 [D], sigma1 [D, D]) and N(mu2, sigma2), in float64.

  method: "scipy" (``scipy.linalg.sqrtm`` of sigma1 @ sigma2, the standard FID computation; ``eps`` is the
  ridge added when that product is singular, ``atol`` the largest imaginary part on the diagonal accepted as
  noise), "eigh" (eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2), no scipy), or "auto" (scipy if installed).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                     f"{sigma2.shape}")
  if method == "auto":
    method = "scipy" if _has_scipy() else "eigh"
  if method == "scipy":
    tr_covmean = _trace_sqrt_product_scipy(sigma1, sigma2, eps, atol)
  elif method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2, atol)
  else:
    raise ValueError(f"method must be 'auto', 'scipy' or 'eigh', got {method!r}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(a: np.ndarray, b: np.ndarray, **kwargs) -> float:
  """FID between feature sets a [N, D] and b [M, D] (keyword arguments as ``frechet_distance``)."""
  return frechet_distance(*statistics(a), *statistics(b), **kwargs)


def compute_features(images: np.ndarray | Iterable[np.ndarray], features_fn: FeaturesFn, *,
                     batch_size: int = 50) -> np.ndarray:
  """Features [N, D] (float64) of images: an array uint8 [N, H, W, 3], cut into batches of ``batch_size``
  (the last one padded so a jitted ``features_fn`` compiles once), or an iterable of such batches."""
  if isinstance(images, (np.ndarray, jax.Array)):
    images = np.asarray(images)
    batches = []
    for start in range(0, images.shape[0], batch_size):
      batch = images[start:start + batch_size]
      batches.append(np.asarray(features_fn(batching.pad_rows(batch, batch_size)), np.float64)[:len(batch)])
  else:
    batches = [np.asarray(features_fn(np.asarray(batch)), np.float64) for batch in images]
  if not batches:
    raise ValueError("no images")
  return np.concatenate(batches)


def fid(images_a: np.ndarray | Iterable[np.ndarray], images_b: np.ndarray | Iterable[np.ndarray],
        features_fn: FeaturesFn, *, batch_size: int = 50, **kwargs) -> float:
  """FID between two image sets (uint8 [N, H, W, 3] arrays or iterables of batches) under ``features_fn``
  (uint8 [B, H, W, 3] -> [B, D]; e.g. ``inception_features_fn``); keyword arguments as ``frechet_distance``."""
  return fid_from_features(compute_features(images_a, features_fn, batch_size=batch_size),
                           compute_features(images_b, features_fn, batch_size=batch_size), **kwargs)


def inception_features_fn(variables: Any, *, size: int = inception.FID_SIZE,
                          transform_input: bool = False) -> Callable[[np.ndarray], jax.Array]:
  """A jitted uint8 images [B, H, W, 3] -> pooled Inception-v3 features [B, 2048] (float32): resized to
  ``size`` and scaled to [-1, 1] by ``inception.resize_input``; ``variables`` from
  ``bigen_jax.convert.inception.params_from_torch``, run in the variant their fc width says
  (``inception.variant_of``: the FID Inception for pytorch-fid's weights). ``transform_input`` as
  ``InceptionV3``'s, for torchvision's ImageNet weights only: the FID Inception takes [-1, 1] as it is."""
  variant = inception.variant_of(variables)
  if transform_input and variant == "fid":
    raise ValueError("transform_input is for torchvision's ImageNet weights; the FID Inception (1008 classes) "
                     "takes inputs in [-1, 1] as they are")
  model = inception.InceptionV3(variant=variant, num_classes=variables["params"]["fc"]["bias"].shape[0],
                                transform_input=transform_input)
  variables = jax.device_put(variables)  # once, as arguments: not baked into the program as constants

  @jax.jit
  def features(variables, images):
    return model.apply(variables, inception.resize_input(images, size))["pool"]
  return functools.partial(features, variables)
