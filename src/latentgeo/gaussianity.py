"""How typical is a latent of i.i.d. N(0, 1)?  A battery of exact or near-exact tests.

``gaussianity_stats(z)`` answers for one latent, ``gaussianity_stats_batch(z)`` for a batch
(one vectorised pass, the same numbers). A latent of shape ``(C, H, W)`` (any number of leading
dimensions, flattened into channels; at least the two trailing spatial ones) is tested against
the null hypothesis "all d = C*H*W entries are independent N(0, 1)".

The family of tests that make the verdict (each p-value is exact unless noted):

``norm``
    |z| against the chi distribution with d degrees of freedom (NAO, Samuel et al. 2023):
    CDF F(r) = P(d/2, r^2/2) (regularised lower incomplete gamma); two-sided p = 2 min(F, 1-F).
``channels``
    per-channel mean and spread: sum_c [n m_c^2 + Phi^-1(F_{chi2(n-1)}(SS_c))^2] ~ chi2(2C),
    with m_c the channel mean and SS_c = sum (x - m_c)^2 (independent of m_c, Cochran).
``correlation`` (C >= 2)
    pairwise uncentred channel correlations r_ij; r sqrt(n-1)/sqrt(1-r^2) ~ t(n-1) exactly for
    isotropic vectors; the squared normal scores are summed ~ chi2(C(C-1)/2) (pairs are
    pairwise independent; the joint chi-square is asymptotic).
``marginal``
    Kolmogorov-Smirnov statistic of Phi(z) against U(0, 1) over all d entries.
``moments``
    skewness and kurtosis via the Hermite moments mean He_3(x), mean He_4(x) (variances 6/d,
    24/d); He_4 has skewness E[He_4^3]/24^1.5/sqrt(d) = 1728/24^1.5/sqrt(d), corrected with a
    three-moment (Pearson type III) approximation; chi2(2) (asymptotic). Orders 1 and 2 are
    covered exactly by ``channels`` and ``norm``. Orders 1-8 are *reported* with their exact
    standard errors sqrt((mu_2n - mu_n^2)/d); they are not in the verdict because the sampling
    law of mean x^n is far from normal for n >= 5 (a normal p-value for order 8 at d = 16384
    over-rejects ~8x at level 0.002).
``spectral``
    per channel, the orthonormal rfft2 power P_k = |X_k|^2 / (H W) of each independent bin
    (conjugate-duplicate columns of rfft2 dropped) is Exponential(1) for complex bins and
    chi-square(1) for self-conjugate (DC / Nyquist) bins; the probability-integral transforms
    are pooled over channels and KS-tested against U(0, 1).
``bands``
    radial power spectrum: the independent bins are cut into B radial frequency bands of equal
    size; per band T_b = sum (2 P_k [complex] or P_k [real]) over bins and channels
    ~ chi2(dof_b) exactly; sum_b Phi^-1(F(T_b))^2 ~ chi2(B). Sensitive to smooth spectral tilts
    (blur, high-pass) that the pooled KS barely sees.

KS p-values use the Kolmogorov limit law with Stephens' finite-n correction
(sqrt(n) + 0.12 + 0.11/sqrt(n)) D, accurate to a few per cent of p at these n.

Verdict: Bonferroni over the m tests (m = 7, or 6 when C = 1): the latent passes when every
p-value is >= alpha / m. The family-wise false-alarm rate is <= alpha for any dependence between
the tests; because they are only weakly dependent it is close to alpha: measured 42/5000 =
0.0084 at alpha = 0.01 on 4x64x64 noise and 38/5000 = 0.0076 on 1x32x32 (every single test's
p-value is uniform under the null; see tests/test_gaussianity.py). ``adjusted_p = min(1, m min p)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.special as sps
import torch

from latentgeo.errors import ShapeError

#: Gaussian raw moments E[x^n], n = 0..16 (double factorials for even n).
GAUSSIAN_MOMENTS: tuple[float, ...] = tuple(
    0.0 if n % 2 else float(math.prod(range(n - 1, 0, -2))) for n in range(17))
#: Orders reported by ``gaussianity_stats``.
MOMENT_ORDERS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
#: Default family-wise false-alarm rate of the verdict.
DEFAULT_ALPHA = 0.01
#: Number of radial bands of the ``bands`` test (fewer for tiny latents).
N_BANDS = 8


@dataclass(frozen=True)
class GaussianityTest:
    """One test of the family: its statistic, the null law it is compared with, its p-value."""

    name: str
    statistic: float
    null: str
    p_value: float


@dataclass(frozen=True)
class GaussianityReport:
    """Result of ``gaussianity_stats`` for one latent (all numbers are Python floats).

    ``moments[i]`` is mean(z^n) for ``n = moment_orders[i]``, ``moment_targets`` the N(0,1)
    values 0, 1, 0, 3, 0, 15, 0, 105, ``moment_se`` sqrt((mu_2n - mu_n^2)/d), and ``moment_z``
    the standardised deviations. ``band_power[b]`` is T_b / dof_b (1 under the null).
    """

    shape: tuple[int, ...]
    d: int
    alpha: float
    norm: float
    norm_mean: float
    norm_mode: float
    norm_z: float
    norm_p: float
    moment_orders: tuple[int, ...]
    moments: tuple[float, ...]
    moment_targets: tuple[float, ...]
    moment_se: tuple[float, ...]
    moment_z: tuple[float, ...]
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    marginal_ks: float
    spectral_ks: float
    band_power: tuple[float, ...]
    tests: tuple[GaussianityTest, ...] = field(default_factory=tuple)

    @property
    def threshold(self) -> float:
        """Per-test level alpha / m (Bonferroni)."""
        return self.alpha / len(self.tests)

    @property
    def p_values(self) -> dict[str, float]:
        return {t.name: t.p_value for t in self.tests}

    @property
    def adjusted_p(self) -> float:
        """Bonferroni-adjusted overall p-value, min(1, m * min_i p_i)."""
        return min(1.0, len(self.tests) * min(t.p_value for t in self.tests))

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tests if not t.p_value >= self.threshold)  # NaN fails

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(passed=self.passed, failed=list(self.failed), threshold=self.threshold,
                   adjusted_p=self.adjusted_p)
        return out


# ---------------------------------------------------------------------------------------------
# Layout helpers shared with the regularisers and the plots.


def as_channels(z: torch.Tensor) -> torch.Tensor:
    """View a latent as (C, H, W): leading dims flattened into channels; 1-D as (1, 1, n)."""
    if z.ndim == 0 or z.numel() == 0:
        raise ShapeError(f"latent must be a non-empty tensor, got shape {tuple(z.shape)}")
    if z.ndim == 1:
        return z.reshape(1, 1, -1)
    return z.reshape(-1, z.shape[-2], z.shape[-1])


@functools.lru_cache(maxsize=32)
def spectral_layout(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The independent bins of ``rfft2`` on an (h, w) grid.

    Returns ``(index, is_real, radius)``, each of length n_bins: ``index`` into the flattened
    (h, w//2 + 1) rfft2 output (int64), ``is_real`` for self-conjugate bins (DC and Nyquist;
    chi-square(1) under the null), ``radius`` the frequency sqrt(f1^2 + f2^2) in cycles/sample.
    Columns 0 and w/2 of rfft2 hold each conjugate pair twice (k1 and -k1); only one is kept,
    so 2 * (#complex) + #real = h * w: every real degree of freedom counted once.
    """
    wr = w // 2 + 1
    k1 = torch.arange(h).unsqueeze(1).expand(h, wr)
    k2 = torch.arange(wr).unsqueeze(0).expand(h, wr)
    self_conj_col = (k2 == 0) | ((w % 2 == 0) & (k2 == w // 2))
    partner = (-k1) % h
    real = self_conj_col & (partner == k1)
    keep = ~self_conj_col | (k1 <= partner)
    f1 = torch.minimum(k1, h - k1).double() / h
    f2 = k2.double() / w
    radius = torch.sqrt(f1 ** 2 + f2 ** 2)
    index = torch.nonzero(keep.flatten()).squeeze(1)
    return index, real.flatten()[index], radius.flatten()[index]


def normalized_power(z: torch.Tensor) -> torch.Tensor:
    """Per-channel normalised power P_k = |rfft2(x)_k|^2 / (H W) of the independent bins.

    z: (..., C, H, W) real (leading dims are batch; use ``as_channels`` first for a single
    latent) -> (..., C, n_bins) in z's dtype. Under i.i.d. N(0, 1): P_k ~ Exponential(1) for
    complex bins, chi-square(1) where ``spectral_layout(H, W)[1]`` is True. Differentiable.
    """
    h, w = z.shape[-2:]
    index, _, _ = spectral_layout(h, w)
    x = torch.fft.rfft2(z, norm="ortho").flatten(-2)
    x = x[..., index.to(z.device)]
    return x.real ** 2 + x.imag ** 2


# ---------------------------------------------------------------------------------------------
# Distribution functions (float64 numpy/scipy: the statistics need no autograd, and single-thread
# numpy is several times faster than torch's threaded kernels on small arrays; tails are handled
# on the side where they are small).

_TINY = np.finfo(np.float64).tiny


def _chi2_z(t: np.ndarray, dof: np.ndarray | float) -> np.ndarray:
    """Normal score Phi^-1(F_{chi2(dof)}(t)), exact, finite in both tails."""
    a = np.asarray(dof, dtype=np.float64) / 2
    lo, hi = sps.gammainc(a, t / 2), sps.gammaincc(a, t / 2)
    return np.where(lo < 0.5, sps.ndtri(np.maximum(lo, _TINY)),
                    -sps.ndtri(np.maximum(hi, _TINY)))


def _chi2_sf(t: np.ndarray, dof: float) -> np.ndarray:
    return sps.gammaincc(dof / 2, t / 2)


def _ks_statistic(u: np.ndarray) -> np.ndarray:
    """Two-sided KS distance of samples u (..., n) in [0, 1] from U(0, 1)."""
    n = u.shape[-1]
    u = np.sort(u, axis=-1)
    i = np.arange(1, n + 1, dtype=np.float64) / n
    return np.maximum((i - u).max(-1), (u - (i - 1 / n)).max(-1))


def _ks_pvalue(dist: np.ndarray, n: int) -> np.ndarray:
    """Kolmogorov limit law with Stephens' correction (Stephens 1970)."""
    sn = math.sqrt(n)
    return sps.kolmogorov((sn + 0.12 + 0.11 / sn) * dist)


def _pearson3_z(x: np.ndarray, skew: float) -> np.ndarray:
    """Normal score of a standardised variable with the given skewness (Pearson type III).

    Matches mean 0, variance 1 and skewness g: x = (G - a)/sqrt(a) with G ~ Gamma(a), a = 4/g^2.
    """
    if abs(skew) < 1e-12:
        return x
    a = 4.0 / skew ** 2
    g = np.maximum(x * math.copysign(math.sqrt(a), skew) + a, 0.0)
    lo, hi = sps.gammainc(a, g), sps.gammaincc(a, g)
    z = np.where(lo < 0.5, sps.ndtri(np.maximum(lo, _TINY)), -sps.ndtri(np.maximum(hi, _TINY)))
    return z if skew > 0 else -z


def chi_mean(d: int) -> float:
    """E|z| for z ~ N(0, I_d): sqrt(2) Gamma((d+1)/2) / Gamma(d/2), via lgamma."""
    return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


# ---------------------------------------------------------------------------------------------
# The batched computation.


def _compute(z: np.ndarray) -> dict:
    """All statistics for a batch z: (B, C, H, W) float64 numpy. Arrays with leading B."""
    b, c, h, w = z.shape
    n = h * w
    d = c * n
    flat = z.reshape(b, d)
    out: dict = {}

    # 1. norm vs chi(d).
    r2 = np.einsum("ij,ij->i", flat, flat)
    lo, hi = sps.gammainc(d / 2, r2 / 2), sps.gammaincc(d / 2, r2 / 2)
    out["norm"] = np.sqrt(r2)
    out["norm_p"] = np.minimum(2 * np.minimum(lo, hi), 1.0)
    out["norm_test"] = (out["norm"], out["norm_p"], f"chi({d})")

    # 2. raw moments 1..8 (reported), one running power at a time.
    power = flat.copy()
    moments = [power.mean(1)]
    for _ in MOMENT_ORDERS[1:]:
        power *= flat
        moments.append(power.mean(1))
    out["moments"] = np.stack(moments, 1)

    # 3. channels: mean and spread per channel, exact chi2(2C).
    xc = z.reshape(b, c, n)
    mean_c = xc.mean(2)
    ss_c = ((xc - mean_c[:, :, None]) ** 2).sum(2)
    out["channel_mean"] = mean_c
    out["channel_std"] = np.sqrt(ss_c / max(n - 1, 1))
    if n > 1:
        t_ch = (n * mean_c ** 2 + _chi2_z(ss_c, n - 1) ** 2).sum(1)
        out["channels"] = (t_ch, _chi2_sf(t_ch, 2 * c), f"chi2({2 * c})")
    else:
        t_ch = (n * mean_c ** 2).sum(1)
        out["channels"] = (t_ch, _chi2_sf(t_ch, c), f"chi2({c})")

    # 4. channel correlation (uncentred cosine; exact t(n-1) per pair).
    if c >= 2 and n >= 3:
        unit = xc / np.maximum(np.linalg.norm(xc, axis=2, keepdims=True), 1e-300)
        cos = unit @ unit.transpose(0, 2, 1)
        i0, i1 = np.triu_indices(c, 1)
        r = np.clip(cos[:, i0, i1], -1 + 1e-15, 1 - 1e-15)
        t = np.abs(r) * math.sqrt(n - 1) / np.sqrt(1 - r * r)
        zs = -sps.ndtri(np.maximum(sps.stdtr(n - 1, -t), _TINY))
        t_corr = (zs ** 2).sum(1)
        out["correlation"] = (t_corr, _chi2_sf(t_corr, len(i0)), f"chi2({len(i0)})")

    # 5. marginal KS against N(0, 1).
    ks_m = _ks_statistic(sps.ndtr(flat))
    out["marginal"] = (ks_m, _ks_pvalue(ks_m, d), f"KS(n={d})")

    # 6. moments: He_3, He_4 (skew-corrected), chi2(2).
    he3 = moments[2] - 3 * moments[0]
    he4 = moments[3] - 6 * moments[1] + 3
    z3 = he3 * math.sqrt(d / 6)
    z4 = _pearson3_z(he4 * math.sqrt(d / 24), 1728 / 24 ** 1.5 / math.sqrt(d))
    t_mom = z3 ** 2 + z4 ** 2
    out["moments_test"] = (t_mom, _chi2_sf(t_mom, 2), "chi2(2)")

    # 7. spectral KS of the probability-integral-transformed power.
    index, is_real, _ = (a.numpy() for a in spectral_layout(h, w))
    spec = np.fft.rfft2(z, norm="ortho").reshape(b, c, -1)[:, :, index]
    p = spec.real ** 2 + spec.imag ** 2  # (B, C, n_bins)
    u = -np.expm1(-p)
    if is_real.any():
        u[:, :, is_real] = sps.gammainc(0.5, p[:, :, is_real] / 2)
    ks_s = _ks_statistic(u.reshape(b, -1))
    n_s = u.shape[1] * u.shape[2]
    out["spectral"] = (ks_s, _ks_pvalue(ks_s, n_s), f"KS(n={n_s})")

    # 8. radial bands: exact chi2 per band, normal scores summed.
    band = _bands(h, w).numpy()
    n_bands = int(band.max()) + 1
    weight = np.where(is_real, 1.0, 2.0)
    wp = (p * weight).sum(1)  # (B, n_bins), summed over channels
    t_b = np.zeros((b, n_bands))
    np.add.at(t_b.T, band, wp.T)
    dof_b = np.bincount(band, weights=weight, minlength=n_bands) * c
    out["band_power"] = t_b / dof_b
    t_band = (_chi2_z(t_b, dof_b) ** 2).sum(1)
    out["bands"] = (t_band, _chi2_sf(t_band, n_bands), f"chi2({n_bands})")
    return out


@functools.lru_cache(maxsize=32)
def _bands(h: int, w: int) -> torch.Tensor:
    """Band index (0..B-1) of each independent bin: B equal-count groups by radius."""
    _, _, radius = spectral_layout(h, w)
    nb = max(1, min(N_BANDS, radius.numel() // 16))
    order = torch.argsort(radius, stable=True)
    band = torch.empty_like(order)
    band[order] = torch.arange(radius.numel()) * nb // radius.numel()
    return band


#: Latents per vectorised chunk (bounds the temporary memory of a large batch).
_CHUNK = 64


def _concat(parts: list):
    if isinstance(parts[0], tuple):
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                parts[0][2])
    return np.concatenate(parts)


_TESTS = ("norm_test", "channels", "correlation", "marginal", "moments_test", "spectral", "bands")


def gaussianity_stats_batch(z: torch.Tensor, alpha: float = DEFAULT_ALPHA
                            ) -> list[GaussianityReport]:
    """``gaussianity_stats`` of each latent of a batch z: (B, *shape) in one vectorised pass.

    Any float dtype and device; computed in float64 on the CPU. Returns B reports.
    """
    if z.ndim < 2:
        raise ShapeError(f"a batch needs shape (B, ...), got {tuple(z.shape)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    shape = tuple(z.shape[1:])
    x = z.detach().to(device="cpu", dtype=torch.float64).numpy()
    x = x.reshape(x.shape[0], 1, 1, -1) if x.ndim == 2 else \
        x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])
    bsz, c, h, w = x.shape
    d = c * h * w
    chunks = [_compute(x[i:i + _CHUNK]) for i in range(0, bsz, _CHUNK)]
    res = {k: _concat([ch[k] for ch in chunks]) for k in chunks[0]}
    mu = [GAUSSIAN_MOMENTS[k] for k in MOMENT_ORDERS]
    se = [math.sqrt((GAUSSIAN_MOMENTS[2 * k] - GAUSSIAN_MOMENTS[k] ** 2) / d)
          for k in MOMENT_ORDERS]
    m_chi = chi_mean(d)
    sd_chi = math.sqrt(max(d - m_chi ** 2, 0.0))
    names = [t for t in _TESTS if t in res]
    reports = []
    for i in range(bsz):
        moments = tuple(float(v) for v in res["moments"][i])
        tests = tuple(GaussianityTest(name=t.removesuffix("_test"),
                                      statistic=float(res[t][0][i]), null=res[t][2],
                                      p_value=float(res[t][1][i])) for t in names)
        norm = float(res["norm"][i])
        reports.append(GaussianityReport(
            shape=shape, d=d, alpha=alpha, norm=norm, norm_mean=m_chi,
            norm_mode=math.sqrt(d - 1), norm_z=(norm - m_chi) / sd_chi if sd_chi > 0 else 0.0,
            norm_p=float(res["norm_p"][i]), moment_orders=MOMENT_ORDERS, moments=moments,
            moment_targets=tuple(mu), moment_se=tuple(se),
            moment_z=tuple((m - t) / s for m, t, s in zip(moments, mu, se)),
            channel_mean=tuple(res["channel_mean"][i].tolist()),
            channel_std=tuple(res["channel_std"][i].tolist()),
            marginal_ks=float(res["marginal"][0][i]), spectral_ks=float(res["spectral"][0][i]),
            band_power=tuple(res["band_power"][i].tolist()), tests=tests))
    return reports


def gaussianity_stats(z: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> GaussianityReport:
    """Test one latent z against i.i.d. N(0, 1) (module docstring: the tests and the verdict).

    z: (C, H, W) or any shape with >= 2 trailing spatial dims (leading dims are channels; a
    1-D tensor is one row), any float dtype/device; statistics run in float64 on the CPU.
    ``report.passed`` is False with probability <= alpha (~ alpha) for a fresh ``randn`` latent.
    """
    return gaussianity_stats_batch(z.unsqueeze(0), alpha)[0]
