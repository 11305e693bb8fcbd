"""The paper's metrics (PSNR, SSIM, LPIPS, FID, pre_error), per image and per region.

Images are NHWC in [-1, 1]; every pixel metric is computed on the [0, 1] scale, as LaMa and
the authors' evaluation do. A mask is [B, H, W, 1] with 1 = hole (the generated region) and
0 = known. A `weight` of the same shape selects the pixels a metric counts (None = all).
"""

import io

import jax
import jax.numpy as jnp
import numpy as np

from asymvq_jax import paths

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
REGIONS = ("whole", "hole", "known")
_HI = jax.lax.Precision.HIGHEST  # TPUs multiply in bfloat16 by default


def _unit(x):
    return (jnp.asarray(x, jnp.float32) + 1.0) / 2.0


def _check_pair(x, y, weight):
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"metrics expect two NHWC batches of equal shape, got {x.shape} and {y.shape}")
    if weight is not None and tuple(weight.shape) != (*x.shape[:3], 1):
        raise ValueError(f"weight/mask must be {(*x.shape[:3], 1)} for images {x.shape}, got {weight.shape}")


def weighted_mean(values, weight=None, empty=jnp.nan):
    """Per-image mean of [B, H, W, C] values over the pixels where `weight` is 1; `empty` where none is."""
    if weight is None:
        return jnp.mean(values, axis=(1, 2, 3))
    w = jnp.broadcast_to(jnp.asarray(weight, values.dtype), values.shape)
    count = jnp.sum(w, axis=(1, 2, 3))
    return jnp.where(count > 0, jnp.sum(values * w, axis=(1, 2, 3)) / jnp.maximum(count, 1.0), empty)


def psnr(x, y, weight=None):
    """Per-image PSNR in dB on the [0, 1] scale (data range 2 in [-1, 1]), over the weighted pixels."""
    _check_pair(x, y, weight)
    return -10.0 * jnp.log10(weighted_mean((_unit(x) - _unit(y)) ** 2, weight))


def pre_error(x, y, mask):
    """The paper's pre_error per image: squared error on the known pixels (mask 0), averaged over
    their values (pixels x channels) on the [0, 1] scale; 0 for an image with no known pixel.

    The authors' eval script sums instead of averaging over the known values; the magnitudes of
    the paper's table (1e-2 for SD's decoder) are those of this per-value mean.
    """
    _check_pair(x, y, mask)
    return weighted_mean((_unit(x) - _unit(y)) ** 2, 1.0 - mask, empty=0.0)


def _gaussian_1d():
    r = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    g = np.exp(-(r ** 2) / (2.0 * SSIM_SIGMA ** 2))
    return (g / g.sum()).astype(np.float32)


def _blur(x, full_map):
    """Separable 11x11 Gaussian filter of each channel (depthwise): zero-padded to the input size
    (full map) or only where the window fits (valid)."""
    c = x.shape[-1]
    g = jnp.asarray(_gaussian_1d())
    pad = SSIM_WINDOW // 2 if full_map else 0
    for shape, padding in (((-1, 1, 1, 1), ((pad, pad), (0, 0))), ((1, -1, 1, 1), ((0, 0), (pad, pad)))):
        kernel = jnp.tile(g.reshape(shape), (1, 1, 1, c))
        x = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, precision=_HI, feature_group_count=c,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return x


def ssim_map(x, y, *, full_map=True):
    """SSIM at every pixel and channel (11x11 Gaussian window, sigma 1.5, K = 0.01, 0.03, [0, 1] scale).

    full_map=True is LaMa's variant, which the paper's table used: the window is zero-padded, so
    the map covers every pixel and the borders see the padding. full_map=False is dm-pix's
    (`dm_pix.ssim`): only the (H - 10) x (W - 10) positions where the window fits. Their image
    means differ by the borders only, so the gap shrinks as images grow.
    """
    a, b = _unit(x), _unit(y)
    mu_a, mu_b = _blur(a, full_map), _blur(b, full_map)
    var_a = _blur(a * a, full_map) - mu_a ** 2
    var_b = _blur(b * b, full_map) - mu_b ** 2
    cov = _blur(a * b, full_map) - mu_a * mu_b
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def ssim(x, y, weight=None, *, full_map=True):
    """Per-image SSIM, the mean of `ssim_map` over the weighted pixels (see `ssim_map`)."""
    _check_pair(x, y, weight)
    if x.shape[1] < SSIM_WINDOW or x.shape[2] < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {x.shape}")
    if weight is not None and not full_map:
        r = SSIM_WINDOW // 2
        weight = weight[:, r:-r, r:-r]
    return weighted_mean(ssim_map(x, y, full_map=full_map), weight)


def region_weights(mask):
    """{region: weight} for the whole image, the hole (mask 1) and the known region (mask 0)."""
    return {"whole": None, "hole": mask, "known": 1.0 - mask}


def per_image(x, y, mask, lpips=None):
    """Every metric per image, {"psnr/hole": [B], ...}; NaN where an image has no pixel in a region.

    Jittable; `lpips` is the LPIPS module of asymvq_jax.losses (whole image only: it is a
    distance between feature maps, not a per-pixel error).
    """
    _check_pair(x, y, mask)
    out = {}
    for region, weight in region_weights(mask).items():
        out[f"psnr/{region}"] = psnr(x, y, weight)
        out[f"ssim/{region}"] = ssim(x, y, weight)
    out["pre_error"] = pre_error(x, y, mask)
    if lpips is not None:
        out["lpips/whole"] = lpips(x, y)
    return out


def summarize(values: dict) -> dict[str, float]:
    """Batch means of `per_image` values (or their concatenation over a dataset), skipping the
    images a region is empty in; a metric no image has a value for is left out."""
    out = {}
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        if np.any(~np.isnan(v)):
            out[name] = float(np.nanmean(v))
    return out


class FeatureStats:
    """Mean and covariance of feature vectors, accumulated over a dataset in float64 on the host."""

    def __init__(self, dim: int = 2048):
        self.n, self.total, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, features) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != len(self.total):
            raise ValueError(f"features must be [N, {len(self.total)}], got {f.shape}")
        self.n += len(f)
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean and the unbiased covariance (np.cov's), as pytorch-fid computes them."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.total / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between two Gaussians: |mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)), in float64.

    tr (s1 s2)^(1/2) is the sum of the square roots of the eigenvalues of s1^(1/2) s2 s1^(1/2),
    a symmetric matrix: no complex square root (pytorch-fid's scipy.linalg.sqrtm) is needed.
    """
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def save_fid_stats(path: str, mu, sigma) -> None:
    """Writes pytorch-fid's `.npz` format (`mu`, `sigma`)."""
    out = io.BytesIO()
    np.savez(out, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    paths.write_bytes(path, out.getvalue())


def load_fid_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a pytorch-fid `.npz` (`mu` [D], `sigma` [D, D]), checking both are there and fit."""
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as f:
        missing = {"mu", "sigma"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: not FID statistics, missing {sorted(missing)} (has {f.files})")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma
