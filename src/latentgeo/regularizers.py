"""Gaussianity regularisers: pure, differentiable ``f(z) -> scalar`` losses (one registry).

Each pushes a latent z (any shape; >= 2 trailing spatial dims for the spectral ones; leading
dims are channels) towards "i.i.d. N(0, 1)". They run in z's geometry dtype (float32 or float64)
and have finite values and gradients everywhere, the zero latent included (safe roots and logs
with the per-dtype epsilon of ``latentgeo.numerics``). Each docstring states the loss's *floor*:
its typical value on a fresh ``randn`` latent, which is where the optimiser should stop caring.

From Hwang, Kim, Sung (NeurIPS 2025, arXiv 2509.07027): ``moment``, ``spectral`` and their
combination ``moment+spectral`` (spectral weight 25); the baselines it unifies: ``kl``,
``kurtosis``, ``norm`` (ReNO) and ``covariance`` (DNO-style, quadratic cost). Beside them,
transcribed as their authors define them: ``dno`` (DNO's probability regulariser, Tang et al.
2024, code TZW1998/Direct-Noise-Optimization ``compute_probability_regularization``) and
``mpgr`` (the paper's regulariser exactly: moments {1, 2} + 25 x spectral on randomly permuted
entries, blocks of 16 DFT magnitudes). ``none`` is the zero regulariser (the unregularised
baseline of ``latentgeo.optimize``).

The random ones (``dno``, ``mpgr``) take a ``generator`` for their permutations; without one
they draw from a fresh generator seeded with ``seed`` (default 0), so a call is a deterministic
function of z. The optimiser passes a generator per iteration (the authors draw fresh
permutations at every call).

Deviation from the paper: the paper's spectral term shuffles the entries before a 1-D FFT. A
random permutation destroys exactly the spatial structure we want to detect: a blurred field
shuffled is i.i.d.-looking again and passes (tests/test_regularizers.py shows it). Our
``spectral`` applies the FFT to the natural layout (per channel, 2-D rfft2, independent bins
only); shuffled views are optional extras (``views=k``), and ``layout="shuffled"`` gives the
paper's variant for comparison. Second deviation: the paper's spectral term matches only the
block means of the magnitudes |X_k|; it is minimised by a flat spectrum of constant magnitude
sqrt(pi)/2, whose power pi/4 < 1 shrinks the latent (we saw reprojection fail the norm test
that way). We add the matching second-moment term: block means of the power |X_k|^2 -> 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from latentgeo.errors import InputError
from latentgeo.gaussianity import GAUSSIAN_MOMENTS, as_channels, normalized_power, spectral_layout
from latentgeo.numerics import eps, geometry_dtype

Regularizer = Callable[[torch.Tensor], torch.Tensor]

#: Rayleigh mean of |X_k| for a complex bin (Re, Im ~ N(0, 1/2)): sqrt(pi)/2.
RAYLEIGH_MEAN = math.sqrt(math.pi) / 2
#: Half-normal mean of |X_k| for a real (DC / Nyquist) bin: sqrt(2/pi).
HALFNORMAL_MEAN = math.sqrt(2 / math.pi)
#: Weight of the spectral term in ``moment+spectral`` (the paper's choice).
SPECTRAL_WEIGHT = 25.0


def _geom(z: torch.Tensor) -> torch.Tensor:
    return z.to(geometry_dtype(z))


def _safe_root(m: torch.Tensor, n: int) -> torch.Tensor:
    """|m|^(1/n) with finite gradient at 0: (m^2 + e^2)^(1/(2n))."""
    e = eps(m.dtype)
    return (m * m + e * e) ** (0.5 / n)


def moment(z: torch.Tensor, orders: int = 4) -> torch.Tensor:
    """Moment matching: sum_{n=1..K} | |mean z^n|^(1/n) - mu_n^(1/n) |  (Hwang et al., Eq. moment).

    z: any shape, float -> scalar (z's geometry dtype). mu_n = E x^n of N(0, 1) (0, 1, 0, 3, ...).
    The 1/n root puts all orders on the scale of x. Floor on d = 16384 noise, K = 4: ~0.35
    (dominated by the odd orders: |mean x^3|^(1/3) ~ (sqrt(15/d))^(1/3)).
    """
    x = _geom(z).flatten()
    loss = x.new_zeros(())
    p = torch.ones_like(x)
    for n in range(1, orders + 1):
        p = p * x
        target = GAUSSIAN_MOMENTS[n] ** (1.0 / n)
        loss = loss + (_safe_root(p.mean(), n) - target).abs()
    return loss


def _block_l1(mag: torch.Tensor, target: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over blocks of |block mean of mag - block mean of target| (last dim blocked)."""
    n = mag.shape[-1]
    pad = (-n) % block
    if pad:
        mag = torch.nn.functional.pad(mag, (0, pad))
        target = torch.nn.functional.pad(target, (0, pad))
    count = torch.nn.functional.pad(torch.ones(n, dtype=mag.dtype, device=mag.device), (0, pad))
    size = count.view(-1, block).sum(-1)
    diff = (mag - target).reshape(*mag.shape[:-1], -1, block).sum(-1) / size
    return diff.abs().mean()


def _shuffled_view(x: torch.Tensor, generator: torch.Generator, block: int) -> torch.Tensor:
    """The paper's view: entries permuted, one 1-D orthonormal rfft, blocked magnitude L1."""
    v = x.flatten()
    perm = torch.randperm(v.numel(), generator=generator).to(v.device)
    return _spectral_l1(v[perm].reshape(1, 1, -1), block)


def _spectral_l1(x: torch.Tensor, block: int, second_moment: bool = True) -> torch.Tensor:
    h, w = x.shape[-2:]
    _, is_real, _ = spectral_layout(h, w)
    e = eps(x.dtype)
    power = normalized_power(x)  # (C, n_bins)
    mag = (power + e * e).sqrt()
    target = torch.where(is_real, HALFNORMAL_MEAN, RAYLEIGH_MEAN).to(x.dtype).to(x.device)
    loss = _block_l1(mag, target.expand_as(mag), block)
    if second_moment:
        loss = loss + _block_l1(power, torch.ones_like(power), block)
    return loss


def spectral(z: torch.Tensor, block: int = 16, views: int = 0, layout: str = "natural",
             seed: int = 0) -> torch.Tensor:
    """Power-spectrum matching (Hwang et al., spectral term), on the natural layout.

    Per channel, orthonormal rfft2 magnitudes |X_k| of the independent bins (duplicate columns
    dropped) should average sqrt(pi)/2 (Rayleigh; sqrt(2/pi) for the real DC/Nyquist bins);
    bins are grouped in raster order into blocks of ``block`` (neighbouring frequencies) and the
    loss is the mean L1 deviation of the block means, plus the same for the power |X_k|^2
    (target 1; see the module docstring). ``views=k`` adds k shuffled 1-D views
    (fixed ``seed``, averaged with the natural one); ``layout="shuffled"`` uses only shuffled
    views (the paper's variant; blind to spatial structure). z: (..., H, W) -> scalar. O(d log d).
    Floor on noise, block = 16: E|N(0, 0.4633^2/16)| + E|N(0, 1/16)| = 0.0925 + 0.1995.
    """
    x = as_channels(_geom(z))
    if layout not in ("natural", "shuffled"):
        raise InputError(f"spectral layout {layout!r}: choose natural or shuffled")
    g = torch.Generator().manual_seed(seed)
    terms = [] if layout == "shuffled" else [_spectral_l1(x, block)]
    n_views = max(views, 1) if layout == "shuffled" else views
    terms += [_shuffled_view(x, g, block) for _ in range(n_views)]
    return torch.stack(terms).mean()


def moment_spectral(z: torch.Tensor, weight: float = SPECTRAL_WEIGHT) -> torch.Tensor:
    """The paper's combination: moment(z) + 25 * spectral(z). Floor ~0.35 + 25 * 0.29."""
    return moment(z) + weight * spectral(z)


def _permutation(n: int, generator: torch.Generator | None, seed: int) -> torch.Tensor:
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)


def _dno_log_prob(v: torch.Tensor, k: int) -> torch.Tensor:
    """DNO's log p_mean + log p_cov of orderings v (P, N k), each as N blocks of k -> (P,)."""
    n = v.shape[-1] // k
    blocks = v.reshape(v.shape[0], n, k)
    m = blocks.mean(1)  # (P, k) mean over blocks
    scaled = blocks / math.sqrt(n)
    c = scaled.transpose(1, 2) @ scaled  # (P, k, k) uncentred second moment
    eye = torch.eye(k, dtype=v.dtype, device=v.device)
    dev = torch.linalg.matrix_norm(c - eye, ord=2)  # spectral norm
    log_mean = torch.clamp(-n * (m * m).sum(-1) / (2 * k), max=-math.log(2))
    excess = torch.clamp(torch.sqrt(1 + dev) - 1 - math.sqrt(k / n), min=0)
    log_cov = torch.clamp(-n * excess ** 2 / 2, max=-math.log(2))
    return log_mean + log_cov


def dno(z: torch.Tensor, k: int = 4, permutations: int = 100,
        generator: torch.Generator | None = None, seed: int = 0) -> torch.Tensor:
    """DNO's probability regulariser (Tang et al. 2024, "Inference-time alignment of diffusion
    models with direct noise optimization", Sec. 4 and ``compute_probability_regularization``).

    The flattened z (d entries) is cut into N = d // k blocks of k (a tail of d mod k entries
    is dropped; DNO assumes k | d). With m = mean over blocks (k,) and C = (1/N) sum_b x_b x_b^T
    (uncentred k x k second moment), the concentration bounds for N(0, I) give
    log p_mean = min(-N |m|^2 / (2k), -log 2) and
    log p_cov = min(-N max(sqrt(1 + ||C - I||_2) - 1 - sqrt(k / N), 0)^2 / 2, -log 2).
    Returns -(sum of both for the natural order + their mean over ``permutations`` random
    orderings), all orderings evaluated as one batch. z: any shape -> scalar. Floor: 4 log 2
    ~ 2.77 (both clamps active), reached by noise most of the time; zero gradient there (the
    bounds are only a penalty once exceeded).
    """
    x = _geom(z).flatten()
    d = x.numel()
    if k < 1 or d // k < 1:
        raise InputError(f"dno needs at least one block of k = {k} entries, got {d}")
    used = (d // k) * k
    orders = [torch.arange(d)]
    if permutations > 0:
        g = generator if generator is not None else torch.Generator().manual_seed(seed)
        orders += [torch.randperm(d, generator=g) for _ in range(permutations)]
    index = torch.stack(orders)[:, :used].to(x.device)
    lp = _dno_log_prob(x[index], k)
    total = lp[0] + lp[1:].mean() if permutations > 0 else lp[0]
    return -total


def mpgr(z: torch.Tensor, block: int = 16, weight: float = SPECTRAL_WEIGHT,
         generator: torch.Generator | None = None, seed: int = 0) -> torch.Tensor:
    """MPGR exactly as the paper defines it (Hwang, Kim, Sung 2025): moment orders {1, 2}
    (``moment(z, orders=2)``) plus ``weight`` (25) x the spectral term on randomly permuted
    entries: x = z flattened (d,) and permuted, X = FFT(x) (d complex bins), magnitudes
    |X_k| / sqrt(d) grouped in order into blocks of ``block`` (16; a short last block averages
    what it has), loss = mean over blocks of | block mean - sqrt(pi)/2 | (Rayleigh mean).

    No second-moment term and no natural layout (compare ``spectral``/``moment+spectral``, the
    module docstring says why those differ). z: any shape -> scalar. Floor on d = 1024 noise:
    ~ 0.03 + 25 x 0.093 ~ 2.4 (block means of 16 Rayleigh magnitudes, sd 0.463 / 4).
    """
    x = _geom(z).flatten()
    d = x.numel()
    perm = _permutation(d, generator, seed).to(x.device)
    f = torch.fft.fft(x[perm])
    e = eps(x.dtype)
    mag = (f.real ** 2 + f.imag ** 2 + e * e).sqrt() / math.sqrt(d)
    spec = _block_l1(mag, torch.full_like(mag, RAYLEIGH_MEAN), block)
    return moment(x, orders=2) + weight * spec


def zero(z: torch.Tensor) -> torch.Tensor:
    """The zero regulariser (``none``): 0 in z's geometry dtype, graph attached to z."""
    return (_geom(z) * 0).sum()


def kl(z: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, s^2) || N(0, 1)) = (mu^2 + s^2 - 1 - log s^2) / 2 of the entries' mean and
    variance (the KL baseline). Floor ~ 1/d (E: (1/d + 1/d)/2 ... = 1/d)."""
    x = _geom(z).flatten()
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    return 0.5 * (mu * mu + var - 1 - torch.log(var + eps(x.dtype)))


def kurtosis(z: torch.Tensor) -> torch.Tensor:
    """(kurtosis - 3)^2 + skewness^2 of the entries (the kurtosis baseline; zero for N(0, 1)).

    Floor ~ 24/d + 6/d (the sampling variances of the sample kurtosis and skewness).
    """
    x = _geom(z).flatten()
    c = x - x.mean()
    m2 = (c * c).mean() + eps(x.dtype)
    skew = (c ** 3).mean() / m2 ** 1.5
    kurt = (c ** 4).mean() / (m2 * m2)
    return (kurt - 3) ** 2 + skew ** 2


def norm(z: torch.Tensor) -> torch.Tensor:
    """ReNO's norm regulariser 1/2 |z|^2 - (d-1) log|z|, shifted by its minimum at
    |z| = sqrt(d-1) so the floor is 0: the negative chi log-density up to a constant.

    z: any shape -> scalar. Near the shell it is ~ (|z| - sqrt(d-1))^2; floor on noise ~ 0.5.
    """
    x = _geom(z).flatten()
    d = x.numel()
    r2 = (x * x).sum()
    m = d - 1
    at_min = 0.5 * m - 0.5 * m * math.log(m) if m > 0 else 0.0
    return 0.5 * r2 - 0.5 * m * torch.log(r2 + eps(x.dtype)) - at_min


def _autocovariance(x: torch.Tensor) -> torch.Tensor:
    """Circular autocovariance c[dy, dx] = mean_p x_p x_{p + (dy, dx)} of x: (H, W), computed
    directly (no FFT) in O((H W)^2) time, O(H W max(H, W)) memory."""
    h, w = x.shape
    shifted = torch.stack([torch.roll(x, -dx, dims=1) for dx in range(w)])  # (W, H, W)
    m = torch.einsum("iw,dkw->dik", x, shifted)  # m[dx, i, k] = sum_w x[i,w] x[k,w+dx]
    i = torch.arange(h, device=x.device)
    k = (i.unsqueeze(1) + i.unsqueeze(0)) % h  # k[i, dy] = i + dy
    c = m[:, i.unsqueeze(1), k].sum(1)  # (W, H): c[dx, dy]
    return c.T / (h * w)


def covariance(z: torch.Tensor) -> torch.Tensor:
    """DNO-style covariance check: the empirical covariance against the identity.

    Per channel, the circular autocovariance at every 2-D lag (c_0 -> 1, c_tau -> 0), computed
    directly in O(d^2) - by Wiener-Khinchin the same information the spectral loss checks in
    O(d log d) - plus the cross-channel covariances at lag 0 (-> 0):
    mean_{c, tau} (c_tau - delta_tau)^2 + mean_{i<j} cov_ij^2. Floor ~ 1/n (n = H W).
    """
    x = as_channels(_geom(z))
    c, h, w = x.shape
    target = torch.zeros(h, w, dtype=x.dtype, device=x.device)
    target[0, 0] = 1
    loss = torch.stack([((_autocovariance(ch) - target) ** 2).mean() for ch in x]).mean()
    if c >= 2:
        flat = x.reshape(c, -1)
        cov = flat @ flat.T / flat.shape[1]
        iu = torch.triu_indices(c, c, 1, device=x.device)
        loss = loss + (cov[iu[0], iu[1]] ** 2).mean()
    return loss


#: name -> regulariser; one registry for the API and the CLI's ``--method`` choices.
REGULARIZERS: dict[str, Regularizer] = {
    "moment": moment,
    "spectral": spectral,
    "moment+spectral": moment_spectral,
    "kl": kl,
    "kurtosis": kurtosis,
    "norm": norm,
    "covariance": covariance,
    "dno": dno,
    "mpgr": mpgr,
    "none": zero,
}

#: Regularisers that take ``generator=`` (random permutations).
RANDOMISED: frozenset[str] = frozenset({"dno", "mpgr"})


def get_regularizer(name: str) -> Regularizer:
    """Look a regulariser up by name; unknown names raise ``InputError`` listing the valid ones."""
    try:
        return REGULARIZERS[name]
    except KeyError:
        raise InputError(f"unknown regulariser {name!r} (choose from "
                         f"{', '.join(REGULARIZERS)})") from None
