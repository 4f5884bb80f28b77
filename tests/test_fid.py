"""FID: statistics, the Fréchet distance against closed forms and independent computations, batching."""

import numpy as np
import pytest

from bigen_jax.eval import fid

NEEDS_SCIPY = pytest.mark.skipif(not fid._has_scipy(), reason="scipy is not installed")
METHODS = (pytest.param("scipy", marks=NEEDS_SCIPY), "eigh")


def _random_orthogonal(d, rng):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))


def _random_spd(d, rng):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_statistics_match_numpy():
  x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
  mu, sigma = fid.statistics(x)
  assert mu.dtype == np.float64 and sigma.shape == (7, 7)
  np.testing.assert_allclose(mu, np.mean(x.astype(np.float64), axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)
  with pytest.raises(ValueError, match="N >= 2"):
    fid.statistics(x[:1])


@pytest.mark.parametrize("method", METHODS)
def test_commuting_covariances_closed_form(method):
  """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: FD = ||mu1 - mu2||^2 + sum(a + b - 2 sqrt(a b))."""
  rng = np.random.default_rng(1)
  d = 12
  q = _random_orthogonal(d, rng)
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, method=method)
  np.testing.assert_allclose(got, want, rtol=1e-9)
  diagonal = fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(b), method=method)
  np.testing.assert_allclose(diagonal, np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_non_commuting_2x2_closed_form(method):
  """For 2x2 M with non-negative eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))."""
  rng = np.random.default_rng(2)
  s1, s2 = _random_spd(2, rng), _random_spd(2, rng)
  assert not np.allclose(s1 @ s2, s2 @ s1)
  m = s1 @ s2
  tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
  mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 2.0])
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2, method=method), want, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_non_commuting_against_torch_eigenvalues(method):
  """tr sqrt(S1 S2) = sum sqrt(eigenvalues of the non-symmetric S1 S2), from torch's general eigensolver."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  d = 16
  s1, s2 = _random_spd(d, rng), _random_spd(d, rng)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  eig = torch.linalg.eigvals(torch.tensor(s1 @ s2, dtype=torch.float64)).numpy()
  assert np.max(np.abs(eig.imag)) < 1e-9
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig.real))
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2, method=method), want, rtol=1e-9)


@NEEDS_SCIPY
def test_features_to_themselves_and_methods_agree():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(300, 10)) * rng.uniform(0.5, 2.0, 10)
  b = rng.normal(size=(200, 10)) + 0.5
  for method in ("scipy", "eigh"):
    assert abs(fid.fid_from_features(a, a, method=method)) < 1e-8
  np.testing.assert_allclose(fid.fid_from_features(a, b, method="scipy"),
                             fid.fid_from_features(a, b, method="eigh"), rtol=1e-8)
  few = rng.normal(size=(20, 40))  # fewer samples than dimensions: singular covariances
  np.testing.assert_allclose(fid.fid_from_features(few, few[::-1] + 0.1, method="scipy"),
                             fid.fid_from_features(few, few[::-1] + 0.1, method="eigh"), atol=1e-4)


@NEEDS_SCIPY
def test_singular_product_retries_with_eps(monkeypatch):
  """A non-finite sqrtm (as scipy can give for singular products) is retried with eps on the diagonals."""
  sqrtm, calls = fid._sqrtm_scipy, []

  def first_call_fails(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else sqrtm(a)
  monkeypatch.setattr(fid, "_sqrtm_scipy", first_call_fails)
  s = np.diag([1.0, 4.0, 0.0])
  assert abs(fid.frechet_distance(np.zeros(3), s, np.zeros(3), s, eps=1e-6, method="scipy")) < 1e-5
  np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(3)) @ (s + 1e-6 * np.eye(3)))


@NEEDS_SCIPY
def test_errors():
  with pytest.raises(ValueError, match="imaginary"):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2), method="scipy")
  for s1, s2 in ((np.diag([1.0, -1.0]), np.eye(2)), (np.eye(2), np.diag([1.0, -1.0]))):
    with pytest.raises(ValueError, match="negative eigenvalue"):
      fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, method="eigh")
  with pytest.raises(ValueError, match="mismatched"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_fid_with_a_batched_feature_function():
  rng = np.random.default_rng(5)
  images_a = rng.integers(0, 256, size=(23, 8, 8, 3), dtype=np.uint8)
  images_b = rng.integers(0, 128, size=(17, 8, 8, 3), dtype=np.uint8)
  shapes = []

  def features_fn(images):
    shapes.append(images.shape)
    return images.reshape(images.shape[0], -1)[:, :6].astype(np.float32)
  got = fid.fid(images_a, images_b, features_fn, batch_size=5)
  assert set(shapes) == {(5, 8, 8, 3)}  # the last batches are padded: one shape, one compile
  want = fid.fid_from_features(images_a.reshape(23, -1)[:, :6], images_b.reshape(17, -1)[:, :6])
  np.testing.assert_allclose(got, want, rtol=1e-12)
  batches = (images_a[i:i + 7] for i in range(0, 23, 7))
  np.testing.assert_allclose(fid.fid(batches, images_b, features_fn, batch_size=5), want, rtol=1e-12)
