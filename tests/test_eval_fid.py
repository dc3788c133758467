"""FID: Fréchet distance, feature statistics, the FID InceptionV3 against pytorch-fid."""

import logging
import os

import jax
import numpy as np
import pytest
import scipy.linalg
from safetensors.numpy import save_file

from imagen_jax import parallel
from imagen_jax.eval import fid as fid_lib
from imagen_jax.eval import inception, metrics

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "inception_parity.npz")


def _random_orthogonal(d, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q


def test_frechet_distance_closed_form_commuting_gaussians():
  # Σ1 = Q D1 Qᵀ, Σ2 = Q D2 Qᵀ commute: FD = ‖Δμ‖² + Σ (d1 + d2 − 2 √(d1 d2)).
  rng = np.random.default_rng(0)
  d = 12
  q = _random_orthogonal(d, 1)
  d1, d2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
  got = metrics.frechet_distance(mu1, (q * d1) @ q.T, mu2, (q * d2) @ q.T)
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  # One-dimensional: (μ1 − μ2)² + (σ1 − σ2)².
  np.testing.assert_allclose(
    metrics.frechet_distance(
      np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])
    ),
    9.0 + 1.0,
  )


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(40, 10)), rng.normal(size=(40, 10)) @ rng.normal(size=(10, 10))
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  mu1, mu2 = a.mean(0), b.mean(0)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8)


def test_fid_of_a_set_against_itself_is_zero_even_when_rank_deficient(caplog):
  feats = np.random.default_rng(3).normal(size=(20, 64)) * 3.0  # N < D: singular covariance
  with caplog.at_level(logging.WARNING):
    stats = metrics.feature_stats(feats, network="n", network_resolution=299, image_resolution=64)
  assert "biased" in caplog.text and "20 samples < feature dimension 64" in caplog.text
  # The square roots of the ~44 zero eigenvalues carry √(rounding) each; scipy's
  # sqrtm is off by as much here (1.8e-5, and 1.3e-4 with pytorch-fid's 1e-6 offset).
  assert abs(metrics.fid(stats, stats)) < 1e-7 * np.trace(stats.sigma)
  shifted = metrics.feature_stats(
    feats + 1.0, network="n", network_resolution=299, image_resolution=64
  )
  np.testing.assert_allclose(metrics.fid(stats, shifted), 64.0, rtol=1e-6)
  # The N×N route (factor, N < D) agrees with the D×D one (whose square roots of
  # zero eigenvalues carry the ~1e-8 relative rounding noted above).
  other = metrics.feature_stats(
    np.random.default_rng(4).normal(size=(100, 64)),
    network="n",
    network_resolution=299,
    image_resolution=64,
  )
  assert stats.factor is not None and other.factor is None
  np.testing.assert_allclose(
    metrics.fid(stats, other),
    metrics.frechet_distance(stats.mu, stats.sigma, other.mu, other.sigma),
    rtol=1e-7,
  )


def test_stats_roundtrip_and_provenance_refused(tmp_path):
  feats = np.random.default_rng(4).normal(size=(30, 8))
  stats = metrics.feature_stats(
    feats,
    network=inception.NETWORK,
    network_resolution=299,
    image_resolution=64,
    source="dataset shapes split test",
  )
  path = str(tmp_path / "s.npz")
  stats.save(path)
  back = metrics.FeatureStats.load(path)
  np.testing.assert_array_equal(back.sigma, stats.sigma)
  assert (back.count, back.network, back.image_resolution) == (30, inception.NETWORK, 64)
  for field, value in (
    ("image_resolution", 256),
    ("network_resolution", 75),
    ("network", "clean-fid"),
  ):
    other = metrics.FeatureStats(**{**vars(stats), field: value})
    with pytest.raises(ValueError, match=f"statistics differ in {field}"):
      metrics.fid(other, back)
  np.savez(tmp_path / "bare.npz", mu=stats.mu, sigma=stats.sigma)
  with pytest.raises(ValueError, match="expected mu, sigma and meta"):
    metrics.FeatureStats.load(str(tmp_path / "bare.npz"))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.feature_stats(feats[:1], network="n", network_resolution=1, image_resolution=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "synthetic.safetensors")
  save_file(inception.synthetic_state_dict(0), path)
  return path


def test_inception_matches_pytorch_fid(weights):
  ref = np.load(FIXTURE)
  state = inception.synthetic_state_dict(int(ref["seed"]))
  # The reference loaded exactly these tensors (strict load_state_dict), fc aside.
  assert sorted(state) == list(ref["names"])
  np.testing.assert_allclose(
    [state[n].astype(np.float64).sum() for n in ref["names"]], ref["sums"], rtol=1e-6, atol=1e-6
  )
  variables = inception.load_variables(weights)
  fn = jax.jit(inception.apply)
  for kind in ("small", "large"):  # 24px upsampled, 320px downsampled to 299
    got = np.asarray(fn(variables, ref[f"images_{kind}"]))
    assert got.shape == (len(ref[f"images_{kind}"]), 2048)
    np.testing.assert_allclose(got, ref[f"features_{kind}"], atol=1e-4, rtol=0)


def test_sharded_features_equal_unsharded(weights):
  images = np.random.default_rng(5).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
  mesh = parallel.make_mesh(None)
  assert mesh.size == 8
  one = fid_lib.InceptionFeatures(weights, batch_size=16, resolution=75)(images)
  sharded = fid_lib.InceptionFeatures(weights, mesh=mesh, batch_size=8, resolution=75)
  assert sharded._extract.num_shards == 8  # pylint: disable=protected-access
  many = sharded(images)
  assert many.shape == (11, 2048)
  np.testing.assert_allclose(many, one, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="uint8 images"):
    sharded(images.astype(np.float32))


def test_bad_weight_files(tmp_path, weights):
  with pytest.raises(FileNotFoundError, match="nowhere.safetensors: no such file"):
    inception.load_variables(str(tmp_path / "nowhere.safetensors"))
  state = inception.synthetic_state_dict(0)
  state["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
  save_file(state, str(tmp_path / "wrong.safetensors"))
  with pytest.raises(ValueError) as e:
    inception.load_variables(str(tmp_path / "wrong.safetensors"))
  message = str(e.value)
  assert "\n" not in message and "wrong.safetensors" in message
  assert "'Mixed_6b.branch7x7_2.conv.weight'" in message and "(1, 7, 128, 128)" in message
  del state["Mixed_6b.branch7x7_2.conv.weight"]
  save_file(state, str(tmp_path / "short.safetensors"))
  with pytest.raises(ValueError, match="'Mixed_6b.branch7x7_2.conv.weight' missing"):
    inception.load_variables(str(tmp_path / "short.safetensors"))
  with pytest.raises(ValueError, match=">= 75"):
    fid_lib.InceptionFeatures(weights, resolution=32)
