"""Numerical safety decided in one place: per-dtype epsilons and the geometry dtype."""

import torch

#: Smallest magnitude treated as non-zero, per dtype (norms, sines, denominators).
EPS: dict[torch.dtype, float] = {
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
    torch.float32: 1e-7,
    torch.float64: 1e-15,
}


def eps(dtype: torch.dtype) -> float:
    """Epsilon for ``dtype`` (float32's for anything not listed)."""
    return EPS.get(dtype, EPS[torch.float32])


def geometry_dtype(x: torch.Tensor) -> torch.dtype:
    """Geometry runs in float32 or float64 whatever the pipeline dtype: float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
