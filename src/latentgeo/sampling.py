"""Reproducible standard-Gaussian seeds."""

import torch


def sample_seeds(n: int, shape: tuple[int, ...], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw ``n`` seeds z ~ N(0, I) of ``shape``; returns (n, *shape).

    Drawn on the CPU with a seeded ``torch.Generator`` so that the same seed gives the same
    tensor on every machine, whatever device the seeds are later used on.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((n, *shape), generator=g, dtype=dtype)
