"""Soft tokens: a few learned vectors added to a frozen model's conditioning, and where they go.

SoftREPA (Lee et al. 2025, arXiv 2503.08250, code softrepa/SoftREPA ``transformer.py``) trains a
handful of "soft tokens" that the frozen network sees beside its text condition, in *both*
branches of classifier-free guidance. latentgeo puts them in two places:

* **class offsets** (the bundled class-conditional pixel DDPM, ``family == "pixel"``): a table
  ``values`` of shape (K, num_class_embeds, dim) added to the UNet's class embedding,

      emb = time_embedding(t) + class_embedding(y) + values[bucket(t), y],

  one row per class *and* the null class (the unconditional branch of guidance reads its own
  row), so the "text" of a class model is its class;
* **cross-attention tokens** (SD 1.x/2.x: ``down``; SDXL: ``down`` and ``mid``): ``values`` of
  shape (K, n, D) inserted right after the BOS token of the text context that the
  cross-attention blocks of those UNet parts read (SoftREPA's ``UNet2DConditionModel_DC``,
  ``cat([ctx[:, :1], tokens, ctx[:, 1:]])``); the up blocks see the plain context.

K is the number of timestep buckets (SoftREPA's optional ``dc_t_tokens``, one embedding per
bucket of 10 training steps): ``bucket(t) = min(floor(t K / T), K - 1)`` with T the model's
training timesteps; K = 1 is one set of tokens for every t. All-zero offsets leave the model
exactly as it was (tested); cross-attention tokens always change the context length, so there
"no tokens" means no :class:`SoftTokens` at all.

The insertion is done by forward hooks registered for the duration of one network call
(:meth:`SoftTokens.applied`), so the backends' own code paths, guidance included, are unchanged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentgeo.errors import InputError, ModelError

#: Token kinds -> where they go.
KINDS = ("class-offsets", "cross-attention")
#: Insertion points a cross-attention token set may name.
CROSS_POINTS = ("down", "mid")
#: File format tag written into every token file.
FORMAT = "latentgeo-soft-tokens-1"
#: Families and their default insertion points (SoftREPA: SD1.5 down blocks, SDXL down + mid).
DEFAULT_POINTS: dict[str, tuple[str, ...]] = {
    "pixel": ("class_embedding",), "sd": ("down",), "sdxl": ("down", "mid")}


def bucket_of(t: torch.Tensor, buckets: int, num_train_timesteps: int) -> torch.Tensor:
    """Timestep bucket per row: min(floor(t K / T), K - 1), clamped at 0; int64 like t's shape."""
    k = torch.div(t.to(torch.float64) * buckets, float(num_train_timesteps), rounding_mode="floor")
    return k.clamp(0, buckets - 1).to(torch.long)


@dataclass
class SoftTokens:
    """One token set. ``values``: (K, rows, dim) float32 (a Parameter while training).

    kind: 'class-offsets' (rows = the UNet's num_class_embeds, dim its time-embedding width) or
    'cross-attention' (rows = tokens, dim = the cross-attention width).
    points: where they go ('class_embedding', or a subset of 'down', 'mid').
    meta: string metadata kept in the file (model fingerprint, family, loss, steps, ...).
    """

    kind: str
    values: torch.Tensor
    points: tuple[str, ...]
    num_train_timesteps: int
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown token kind {self.kind!r} (expected one of {KINDS})")
        if self.values.ndim != 3:
            raise ValueError(f"token values must be (K, rows, dim), got {tuple(self.values.shape)}")
        if self.kind == "cross-attention" and not set(self.points) <= set(CROSS_POINTS):
            raise ValueError(f"cross-attention points must be among {CROSS_POINTS}")

    @property
    def buckets(self) -> int:
        return int(self.values.shape[0])

    def copy(self, values: torch.Tensor | None = None) -> SoftTokens:
        """The same token set with other values (a detached clone of ours by default)."""
        v = self.values.detach().clone() if values is None else values
        return SoftTokens(self.kind, v, self.points, self.num_train_timesteps, dict(self.meta))

    def rows_at(self, t: torch.Tensor) -> torch.Tensor:
        """values[bucket(t)] for per-row times t (B,) -> (B, rows, dim)."""
        return self.values[bucket_of(t, self.buckets, self.num_train_timesteps).to(
            self.values.device)]

    @contextlib.contextmanager
    def applied(self, network: Any, t: torch.Tensor) -> Iterator[None]:
        """Hooks that add these tokens to ``network`` for calls inside the block.

        network: the family's UNet (UNet2DModel with a class embedding, or
        UNet2DConditionModel). t: (B,) the timesteps of the call's rows (both guidance halves).
        """
        rows = self.rows_at(t.reshape(-1))
        handles = []
        if self.kind == "class-offsets":
            def add_offsets(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
                labels = args[0]
                picked = rows[torch.arange(labels.shape[0], device=rows.device),
                              labels.to(rows.device)]
                return out + picked.to(out.device, out.dtype)

            handles.append(network.class_embedding.register_forward_hook(add_offsets))
        else:
            def insert(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                ctx = kwargs.get("encoder_hidden_states")
                if ctx is None:
                    return args, kwargs
                tok = rows.to(ctx.device, ctx.dtype)
                kwargs = dict(kwargs)
                kwargs["encoder_hidden_states"] = torch.cat([ctx[:, :1], tok, ctx[:, 1:]], dim=1)
                mask = kwargs.get("encoder_attention_mask")
                if mask is not None:
                    ones = mask.new_ones(mask.shape[0], tok.shape[1])
                    kwargs["encoder_attention_mask"] = torch.cat(
                        [mask[:, :1], ones, mask[:, 1:]], dim=1)
                return args, kwargs

            for block in cross_attention_blocks(network, self.points):
                handles.append(block.register_forward_pre_hook(insert, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def cross_attention_blocks(unet: Any, points: tuple[str, ...]) -> list[Any]:
    """The blocks of a UNet2DConditionModel whose context gets the tokens: its down blocks
    with cross-attention ('down') and its mid block ('mid')."""
    blocks = []
    if "down" in points:
        blocks += [b for b in unet.down_blocks if getattr(b, "has_cross_attention", False)]
    if "mid" in points and getattr(unet.mid_block, "has_cross_attention", False):
        blocks.append(unet.mid_block)
    return blocks


def new_tokens(backend: Any, buckets: int = 1, n_tokens: int = 4,
               points: tuple[str, ...] | None = None, init_std: float = 0.0,
               generator: torch.Generator | None = None) -> SoftTokens:
    """Fresh tokens for a backend's network (zeros, or N(0, init_std^2) as SoftREPA's 0.02).

    Class models: offsets (buckets, num_class_embeds, time-embedding width). SD / SDXL: ``n_tokens``
    tokens of the cross-attention width at ``points`` (default: the family's, DEFAULT_POINTS).
    ModelError for families without an insertion point (flow models: SD3, FLUX, bundled-flow).
    """
    family = backend.family
    if buckets < 1 or n_tokens < 1:
        raise InputError("token buckets and token count must be at least 1")
    unet = getattr(backend, "unet", None)
    if family not in DEFAULT_POINTS or unet is None or getattr(backend, "flow", False):
        raise ModelError(f"{backend.name}: soft tokens are implemented for the bundled-format "
                         "class-conditional DDPM, SD 1.x/2.x and SDXL, not for this "
                         f"{family} model")
    T = int(backend.scheduler.config.num_train_timesteps)
    if family == "pixel":
        if backend.conditioning != "class" or unet.class_embedding is None:
            raise ModelError(f"{backend.name}: soft tokens for a pixel model are offsets to its "
                             "class embedding, and it has none (unconditional model)")
        shape = (buckets, int(unet.class_embedding.num_embeddings),
                 int(unet.class_embedding.embedding_dim))
        points = ("class_embedding",)
        kind = "class-offsets"
    else:
        points = tuple(points or DEFAULT_POINTS[family])
        bad = [p for p in points if p not in CROSS_POINTS]
        if bad or not points:
            raise InputError(f"token insertion point {bad[0] if bad else '(none)'}: use "
                             f"{' and/or '.join(CROSS_POINTS)}")
        if not cross_attention_blocks(unet, points):
            raise ModelError(f"{backend.name}: its UNet has no cross-attention block at "
                             f"{'/'.join(points)}")
        shape = (buckets, n_tokens, int(unet.config.cross_attention_dim))
        kind = "cross-attention"
    values = torch.zeros(shape, dtype=torch.float32)
    if init_std > 0:
        values.normal_(0.0, init_std, generator=generator)
    return SoftTokens(kind, values.to(backend.device), points, T,
                      {"model": backend.name, "fingerprint": backend.fingerprint(),
                       "family": family})


def check_fits(tokens: SoftTokens, backend: Any, source: str = "soft tokens") -> None:
    """ModelError (one line) unless ``tokens`` were trained for this backend's weights."""
    want = tokens.meta.get("fingerprint")
    have = backend.fingerprint()
    if want != have or tokens.meta.get("family") != backend.family:
        raise ModelError(f"{source}: trained for {tokens.meta.get('model', '?')} (fingerprint "
                         f"{want}, {tokens.meta.get('family', '?')}), not for {backend.name} "
                         f"(fingerprint {have}, {backend.family})")
    expect = new_tokens(backend, buckets=tokens.buckets,
                        n_tokens=int(tokens.values.shape[1]), points=tokens.points
                        if tokens.kind == "cross-attention" else None)
    if tokens.kind != expect.kind or tuple(tokens.values.shape) != tuple(expect.values.shape):
        raise ModelError(f"{source}: token shape {tuple(tokens.values.shape)} does not fit "
                         f"{backend.name} (expects {tuple(expect.values.shape)})")


def attach(backend: Any, tokens: SoftTokens | None, source: str = "soft tokens") -> None:
    """Make every later network call of ``backend`` (both guidance branches) use ``tokens``
    (None removes them); refuses tokens trained for other weights (:func:`check_fits`)."""
    if tokens is not None:
        check_fits(tokens, backend, source)
        tokens = tokens.copy(tokens.values.detach().to(backend.device, torch.float32))
    backend.soft_tokens = tokens


# -- files --------------------------------------------------------------------------------------

def save_tokens(path: str | Path, tokens: SoftTokens, force: bool = False,
                extra: dict[str, Any] | None = None,
                negative: SoftTokens | None = None) -> Path:
    """Write tokens as safetensors (key ``tokens``) with string metadata: format, kind, points,
    buckets, num_train_timesteps and ``tokens.meta`` (model, fingerprint, family, loss,
    steps, ...), plus ``extra`` values (JSON-encoded when not strings). Atomic; refuses to
    overwrite without ``force``. ``negative``: AGSM's negative bank, kept as ``negative``
    (never applied at inference)."""
    from safetensors.torch import save_file

    from latentgeo.io import atomic_write

    meta = {**tokens.meta, **{k: v if isinstance(v, str) else json.dumps(v)
                              for k, v in (extra or {}).items()}}
    meta.update(format=FORMAT, kind=tokens.kind, points=",".join(tokens.points),
                buckets=str(tokens.buckets), num_train_timesteps=str(tokens.num_train_timesteps))
    tensors = {"tokens": tokens.values.detach().to("cpu", torch.float32).contiguous()}
    if negative is not None:
        tensors["negative"] = negative.values.detach().to("cpu", torch.float32).contiguous()
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), meta), force=force)


def load_tokens(path: str | Path) -> SoftTokens:
    """Read a token file written by :func:`save_tokens` (safetensors only: no pickles).
    InputError naming the file for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such token file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            values = f.get_tensor("tokens") if "tokens" in keys else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: not a readable safetensors token file ({first})") from None
    if meta.get("format") != FORMAT or values is None:
        raise InputError(f"{path}: not a latentgeo soft-token file (no '{FORMAT}' format tag "
                         "or no 'tokens' tensor)")
    try:
        tokens = SoftTokens(meta["kind"], values.to(torch.float32),
                            tuple(p for p in meta["points"].split(",") if p),
                            int(meta["num_train_timesteps"]), meta)
    except (KeyError, ValueError) as e:
        raise InputError(f"{path}: damaged token metadata ({e})") from None
    if not torch.isfinite(tokens.values).all():
        raise InputError(f"{path}: token values are not all finite")
    return tokens
