"""FID and CLIP score arithmetic: feature statistics, Fréchet distance, cosine scores.

Everything here is host-side NumPy in float64: the features come from the
jitted extractors (``features.FeatureExtractor``), the statistics of a few
thousand 2048-d vectors are cheap, and the matrix square root needs the
precision.

``FeatureStats`` records what produced it (feature network, its input
resolution, the images' resolution) and ``check_compatible`` refuses to
compare statistics of different provenance: an FID between Inception features
of 64px and 256px images, or of two Inception ports, is not a number anyone
can compare.
"""

import dataclasses
import json
import logging
import os
from typing import Optional

import numpy as np

MIN_SAMPLES = 2  # a covariance needs two samples; below the feature dimension it is biased

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class FeatureStats:
  """Mean and covariance of a feature set, with where they came from."""

  mu: np.ndarray  # float64 [D]
  sigma: np.ndarray  # float64 [D, D]
  count: int  # N, the samples behind them
  network: str  # e.g. inception.NETWORK
  network_resolution: int  # the network's input side (299 for FID)
  image_resolution: int  # the images' side before the network resized them
  source: str = ""  # free text: dataset/split, folder or run
  # (features − mu) / √(N − 1), float64 [N, D], kept in memory when N <= D: then
  # sigma = factorᵀ factor has rank < N and the FID needs only N×N matrices.
  factor: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)

  def save(self, path: str) -> None:
    """Writes an .npz with mu, sigma and the provenance fields."""
    meta = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("mu", "sigma", "factor")}
    np.savez(path, mu=self.mu, sigma=self.sigma, meta=json.dumps(meta))

  @classmethod
  def load(cls, path: str) -> "FeatureStats":
    """Reads ``save``'s .npz.

    Raises:
      FileNotFoundError: no such file.
      ValueError: an .npz without the provenance this module writes.
    """
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{path}: no such reference statistics file "
        "(python -m imagen_jax.eval.fid_stats writes one)"
      )
    with np.load(path) as data:
      if "meta" not in data or "mu" not in data or "sigma" not in data:
        raise ValueError(
          f"{path}: expected mu, sigma and meta (what network and resolution "
          "produced them; python -m imagen_jax.eval.fid_stats), found "
          f"{sorted(data.files)}"
        )
      meta = json.loads(str(data["meta"]))
      return cls(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64), **meta)

  def check_compatible(self, other: "FeatureStats") -> None:
    """Raises ValueError unless both come from the same network at the same resolutions."""
    for field in ("network", "network_resolution", "image_resolution"):
      a, b = getattr(self, field), getattr(other, field)
      if a != b:
        raise ValueError(
          f"statistics differ in {field}: {a!r} ({self.source or 'samples'}) "
          f"vs {b!r} ({other.source or 'reference'}); recompute the "
          f"reference with python -m imagen_jax.eval.fid_stats at the same "
          "network and resolution"
        )


def feature_stats(
  features: np.ndarray,
  *,
  network: str,
  network_resolution: int,
  image_resolution: int,
  source: str = "",
) -> FeatureStats:
  """Mean and (unbiased) covariance of features [N, D], in float64.

  Raises:
    ValueError: N < MIN_SAMPLES. Fewer samples than D only warn: the
      covariance is then rank-deficient and FID biased upwards (the papers
      use N >= 10k for D = 2048).
  """
  features = np.asarray(features, np.float64)
  n, d = features.shape
  if n < MIN_SAMPLES:
    raise ValueError(f"{n} samples: a covariance needs at least {MIN_SAMPLES}")
  if n < d:
    _log.warning(
      "FID from %d samples < feature dimension %d: the covariance is "
      "rank-deficient and the estimate biased upwards; compare only "
      "numbers from equally many samples (papers use 10k-50k)",
      n,
      d,
    )
  mu = features.mean(0)
  factor = (features - mu) / np.sqrt(n - 1)
  return FeatureStats(
    mu=mu,
    sigma=factor.T @ factor,
    count=n,
    network=network,
    network_resolution=network_resolution,
    image_resolution=image_resolution,
    source=source,
    factor=factor if n <= d else None,
  )


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix (eigenvalues below 0 from rounding → 0)."""
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
  mu1: np.ndarray,
  sigma1: np.ndarray,
  mu2: np.ndarray,
  sigma2: np.ndarray,
  factor1: Optional[np.ndarray] = None,
) -> float:
  """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in float64.

  tr((Σ1 Σ2)^½) is computed as tr((Σ1^½ Σ2 Σ1^½)^½): the two matrices are
  similar, and the second is symmetric PSD, so an eigendecomposition gives it
  without the complex parts and singular-product failures of a general sqrtm
  (pytorch-fid's fallback adds 1e-6 to the diagonals instead; with well-
  conditioned covariances both agree to ~1e-6 relative).

  With ``factor1`` (F [N, D], sigma1 = Fᵀ F, N < D) the nonzero eigenvalues of
  Σ1 Σ2 are those of F Σ2 Fᵀ [N, N]: the same number from an N×N problem
  (a few milliseconds instead of two 2048² eigendecompositions).

  Args:
    mu1, mu2: means [D]. sigma1, sigma2: covariances [D, D].
    factor1: optional F [N, D] with sigma1 = Fᵀ F.

  Returns:
    The squared Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(
      f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
    )
  if factor1 is not None:
    inner = factor1 @ sigma2 @ factor1.T
  else:
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)
  tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(samples: FeatureStats, reference: FeatureStats) -> float:
  """FID of two compatible statistics (``check_compatible``)."""
  samples.check_compatible(reference)
  if samples.factor is None and reference.factor is not None:
    samples, reference = reference, samples  # Symmetric: factor the low-rank one.
  return frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma, samples.factor)


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
  """Per-pair CLIP score: 100 · max(cos(image, text), 0), float64 [N].

  Args:
    image_emb: [N, E] image embeddings; text_emb: [N, E], row i the caption
      of image i (unnormalized projections).
  """
  a = np.asarray(image_emb, np.float64)
  b = np.asarray(text_emb, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 100.0 * np.clip((a * b).sum(-1), 0.0, None)


def summary(values: np.ndarray) -> dict[str, Optional[float]]:
  """{'mean', 'std', 'count'} of per-sample scores."""
  values = np.asarray(values, np.float64)
  return {
    "mean": float(values.mean()) if len(values) else None,
    "std": float(values.std()) if len(values) else None,
    "count": int(len(values)),
  }
