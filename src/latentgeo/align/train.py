"""The soft-token training loop: a frozen backend, (image, condition) pairs, one loss.

Each step (Lee et al. 2025, SoftREPA ``train.py``): draw B pairs with distinct conditions where
the data allow it (else repeats are masked, :func:`latentgeo.align.losses.keep_mask`), one
timestep t uniform over the model's training timesteps and one noise eps shared by the batch,
x_t = alpha_t x0 + sigma_t eps, and evaluate the network on every (image, condition) pair
through the backend's own model function (guidance 1) with the tokens hooked in. Only the tokens
(and SoftREPA's scale and temperature) receive gradients; the networks stay frozen. AdamW
lr 1e-3 (1e-2 for the bundled model's class offsets), weight decay 1e-4 (SoftREPA's).
Progress is a callback; nothing is printed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentgeo.align.losses import (
    EMA_DECAY,
    GAMMA_NEG,
    GAMMA_POS,
    SCALE_INIT,
    TEMPERATURE_INIT,
    agsm_loss,
    agsm_targets,
    condition_ids,
    ema_update,
    pair_errors,
    softrepa_loss,
)
from latentgeo.align.tokens import SoftTokens, new_tokens
from latentgeo.diffusion.grid import estimate_coefficients, vp_level
from latentgeo.errors import InputError, ModelError

#: Loss names -> what they train (the CLI's --loss choices).
LOSSES = ("softrepa", "agsm")
#: SoftREPA's denoising weight per family (0 for SD3, 10 for SD1.5/SDXL; the bundled VP model
#: takes the UNet value).
DWEIGHT = {"pixel": 10.0, "sd": 10.0, "sdxl": 10.0}

#: Learning rate per family: SoftREPA's 1e-3 for text tokens; the bundled model's class
#: embeddings have entries of size ~1 (row norms ~8), which 1e-3 AdamW steps barely move in a
#: few hundred steps, so its offsets train at 1e-2.
DEFAULT_LR = {"pixel": 1e-2, "sd": 1e-3, "sdxl": 1e-3}

#: callback(step, steps, loss) after every step.
TrainCallback = Callable[[int, int, float], None]


@dataclass
class AlignResult:
    """tokens: the tokens to use at inference (AGSM: the positive bank). negative: AGSM's
    negative bank (None for SoftREPA). history: loss per step. seconds: wall time of the loop.
    extra: learned scale / temperature (SoftREPA) and the settings."""

    tokens: SoftTokens
    negative: SoftTokens | None
    history: list[float]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def training_level(backend: Any, t: int) -> tuple[float, float, str]:
    """(alpha, sigma, prediction) of a VP backend at training timestep t."""
    scheduler = backend.scheduler
    a = float(scheduler.alphas_cumprod[int(t)])
    alpha, sigma = vp_level(a)
    return alpha, sigma, str(scheduler.config.prediction_type)


def training_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha: float,
                    sigma: float) -> torch.Tensor:
    """What the network predicts at (alpha, sigma): eps, v = alpha eps - sigma x0 (Salimans &
    Ho 2022) or x0."""
    if prediction == "epsilon":
        return eps.expand_as(x0)
    if prediction == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction == "sample":
        return x0
    raise ModelError(f"prediction type {prediction!r} is not supported for soft tokens")


def pair_outputs(backend: Any, x_t: torch.Tensor, t: torch.Tensor,
                 conditions: Sequence[Any]) -> torch.Tensor:
    """Outputs of every noisy image with every condition: x_t (B, *shape) -> (B, B, *shape),
    [i, j] = model(x_t[i], t, condition j) at guidance 1, tokens as attached to ``backend``."""
    b = x_t.shape[0]
    x = x_t.repeat_interleave(b, dim=0)
    model = backend.model_fn(list(conditions) * b, guidance=1.0)
    return model(x, t).reshape(b, b, *x_t.shape[1:])


def _batches(conditions: Sequence[Any], batch_size: int, generator: torch.Generator
             ) -> Callable[[], list[int]]:
    """A sampler of B indices with distinct conditions when there are B distinct ones (one
    random example of each of B random conditions), else B random indices."""
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(conditions):
        groups.setdefault(c, []).append(i)
    keys = list(groups)

    def draw() -> list[int]:
        if len(keys) >= batch_size:
            pick = torch.randperm(len(keys), generator=generator)[:batch_size].tolist()
            out = []
            for k in pick:
                members = groups[keys[k]]
                out.append(members[int(torch.randint(len(members), (1,), generator=generator))])
            return out
        return torch.randint(len(conditions), (batch_size,), generator=generator).tolist()

    return draw


def train_tokens(backend: Any, images: torch.Tensor, conditions: Sequence[Any],
                 loss: str = "softrepa", steps: int = 600, batch_size: int = 10,
                 lr: float | None = None, weight_decay: float = 1e-4, buckets: int = 1,
                 n_tokens: int = 4, seed: int = 0, dweight: float | None = None,
                 t_range: tuple[int, int] | None = None,
                 callback: TrainCallback | None = None) -> AlignResult:
    """Train soft tokens for a frozen ``backend`` on (image, condition) pairs.

    images: (N, C, H, W) in [0, 1] (the backend's image size); conditions: N conditions the
    backend takes (class ints, prompts). loss: 'softrepa' or 'agsm'. lr: AdamW's (default
    :data:`DEFAULT_LR` of the family). Tokens: zeros at the
    start (all-zero class offsets are the plain model exactly; cross-attention tokens start at
    N(0, 0.02^2) as SoftREPA's). t uniform on ``t_range`` (default every training timestep).
    Deterministic for a given ``seed`` on the CPU. Returns :class:`AlignResult`; the tokens
    carry the model's fingerprint and the loss, steps and settings in ``meta``.
    """
    if loss not in LOSSES:
        raise InputError(f"loss {loss!r}: use one of {', '.join(LOSSES)}")
    if steps < 1 or batch_size < 2:
        raise InputError("steps must be >= 1 and batch size >= 2 (a contrastive batch)")
    lr = DEFAULT_LR.get(backend.family, 1e-3) if lr is None else float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise InputError(f"learning rate {lr}: must be a positive number")
    n = images.shape[0]
    if n != len(conditions) or n < 2:
        raise InputError(f"{n} images and {len(conditions)} conditions: need as many of each, "
                         "at least 2")
    if len(set(conditions)) < 2:
        raise InputError("every example has the same condition: a contrastive loss needs at "
                         "least two different ones")
    backend.check_condition(list(conditions))
    T = int(backend.scheduler.config.num_train_timesteps)
    lo, hi = t_range if t_range is not None else (0, T)
    if not 0 <= lo < hi <= T:
        raise InputError(f"timestep range {lo}..{hi}: must lie in 0..{T}")
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        x0_all = torch.cat([backend.encode(images[i:i + 64]).to(torch.float32)
                            for i in range(0, n, 64)])
    init_std = 0.0 if backend.family == "pixel" else 0.02
    tokens = new_tokens(backend, buckets=buckets, n_tokens=n_tokens, init_std=init_std,
                        generator=generator)
    tokens.values = torch.nn.Parameter(tokens.values)
    params: list[torch.Tensor] = [tokens.values]
    scale = temperature = None
    negative = ema = None
    dw = DWEIGHT.get(backend.family, 0.0) if dweight is None else float(dweight)
    if loss == "softrepa":
        scale = torch.nn.Parameter(torch.tensor(SCALE_INIT))
        temperature = torch.nn.Parameter(torch.tensor(TEMPERATURE_INIT))
        params += [scale, temperature]
    else:
        negative = tokens.copy()
        negative.values = torch.nn.Parameter(negative.values)
        params.append(negative.values)
        ema = tokens.copy()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=weight_decay)
    draw = _batches(list(conditions), batch_size, generator)
    history: list[float] = []
    saved = backend.soft_tokens
    start = time.perf_counter()
    try:
        for step in range(steps):
            idx = draw()
            x0 = x0_all[idx].to(backend.device)
            conds = [conditions[i] for i in idx]
            ids = condition_ids(conds)
            t_int = int(torch.randint(lo, hi, (1,), generator=generator))
            eps = torch.randn((1, *x0.shape[1:]), generator=generator).to(x0.device)
            alpha, sigma, prediction = training_level(backend, t_int)
            x_t = alpha * x0 + sigma * eps
            target = training_target(prediction, x0, eps, alpha, sigma)
            t = torch.tensor(t_int, dtype=torch.long)
            optimizer.zero_grad(set_to_none=True)
            if loss == "softrepa":
                backend.soft_tokens = tokens
                out = pair_outputs(backend, x_t, t, conds).to(torch.float32)
                value = softrepa_loss(pair_errors(out, target), ids, scale, temperature, dw)
            else:
                backend.soft_tokens = ema
                with torch.no_grad():
                    ema_out = pair_outputs(backend, x_t, t, conds).to(torch.float32)
                c4 = estimate_coefficients(prediction, alpha, sigma)[3]
                t_pos, t_neg = agsm_targets(target, ema_out, ids, c4, gamma_pos=GAMMA_POS,
                                            gamma_neg=GAMMA_NEG)
                backend.soft_tokens = tokens
                pos = backend.model_fn(conds, guidance=1.0)(x_t, t).to(torch.float32)
                backend.soft_tokens = negative
                neg = backend.model_fn(conds, guidance=1.0)(x_t, t).to(torch.float32)
                value = agsm_loss(pos, neg, t_pos, t_neg)
            if not torch.isfinite(value):
                raise ModelError(f"soft-token training diverged at step {step + 1} (loss "
                                 f"{value.item()}); use a lower learning rate")
            value.backward()
            optimizer.step()
            if ema is not None:
                ema_update(ema.values, tokens.values, EMA_DECAY)
            history.append(float(value.detach()))
            if callback is not None:
                callback(step + 1, steps, history[-1])
    finally:
        backend.soft_tokens = saved
    seconds = time.perf_counter() - start
    settings = {"loss": loss, "steps": str(steps), "batch_size": str(batch_size),
                "lr": repr(lr), "weight_decay": repr(weight_decay), "buckets": str(buckets),
                "seed": str(seed), "t_range": f"{lo},{hi}", "train_seconds": f"{seconds:.1f}",
                "examples": str(n)}
    extra: dict[str, Any] = {}
    if scale is not None and temperature is not None:
        scale, temperature = scale.detach(), temperature.detach()
        settings.update(dweight=repr(dw), scale=f"{float(scale):.6g}",
                        temperature=f"{float(temperature):.6g}")
        extra.update(scale=float(scale), temperature=float(temperature))
    else:
        settings.update(gamma_pos=repr(GAMMA_POS), gamma_neg=repr(GAMMA_NEG),
                        ema_decay=repr(EMA_DECAY), a_of_t="1 (eps units, summed)",
                        bank="positive")
    final = tokens.copy()
    final.meta.update(settings)
    neg_final = None
    if negative is not None:
        neg_final = negative.copy()
        neg_final.meta.update(settings, bank="negative")
    return AlignResult(final, neg_final, history, seconds, {**extra, **settings})
