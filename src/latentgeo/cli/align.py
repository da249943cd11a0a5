"""``latentgeo align``: train soft tokens (SoftREPA or AGSM) for a frozen model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentgeo.cli.common import print_json, print_table
from latentgeo.cli.options import Device, Dtype, Force, Json, Model, Seed, finite

#: Default training steps: the bundled model's default run (10 classes x 10 conditions per
#: step) finishes in well under 15 minutes on a quiet 2-core CPU (docs/results/align.md).
DEFAULT_STEPS = 600


def align(
    data: Annotated[Path | None, typer.Argument(
        help="Folder of images with metadata.jsonl (file_name + text or label per line); "
        "default: the bundled digits' training split.", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Token file to write "
                                         "(.safetensors).")] = Path("tokens.safetensors"),
    model: Model = "bundled",
    loss: Annotated[str, typer.Option("--loss", help="softrepa (contrastive) or agsm "
                                      "(shifted score-matching target).")] = "softrepa",
    steps: Annotated[int, typer.Option("--max-iters", min=1, max=10_000_000,
                                       help="Training iterations (optimiser steps; --steps "
                                       "means diffusion steps everywhere).")] = DEFAULT_STEPS,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Pairs per step; "
                                            "every image meets every condition of the "
                                            "batch (B x B network rows).")] = 10,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, callback=finite,
                                             help="AdamW learning rate "
                                             "(default 1e-2 for class models, 1e-3 for "
                                             "SD/SDXL).")] = None,
    buckets: Annotated[int, typer.Option("--buckets", min=1, help="Timestep buckets (one "
                                         "token set per bucket).")] = 1,
    n_tokens: Annotated[int, typer.Option("--tokens", min=1, help="Tokens per set (SD/SDXL; "
                                          "class models learn one offset per class).")] = 4,
    seed: Seed = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    force: Force = False,
    json: Json = False,
) -> None:
    """Train soft tokens so the model follows its condition without guidance (SoftREPA /
    AGSM); the network stays frozen. The file records the model's fingerprint: other models
    refuse it. Use it with `render --soft-tokens FILE` (also invert and optimize)."""
    from latentgeo.align.data import bundled_digits, load_pairs
    from latentgeo.align.tokens import save_tokens
    from latentgeo.align.train import LOSSES, train_tokens
    from latentgeo.cli.common import progress_bar
    from latentgeo.diffusion import load_model
    from latentgeo.errors import InputError, OutputExistsError

    if loss not in LOSSES:
        raise InputError(f"--loss {loss!r}: choose {' or '.join(LOSSES)}")
    out = Path(output)
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"-o {out}: token files are .safetensors")
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: exists (use --force to overwrite)")
    if data is not None and not data.is_dir():
        raise InputError(f"{data}: not a folder (DATA is a folder of images with "
                         "metadata.jsonl)")
    backend = load_model(model, device, dtype)
    if data is None:
        if backend.conditioning != "class" or backend.num_classes != 10:
            raise InputError(f"{backend.name}: the bundled digits need a 10-class model; "
                             "give a DATA folder with captions for this one")
        images, conditions = bundled_digits()
        source = "bundled digits (training split)"
    else:
        images, conditions = load_pairs(data, backend.image_size, backend.image_channels)
        source = str(data)
    with progress_bar(f"training {loss} tokens", steps, quiet=json) as advance:
        result = train_tokens(backend, images, conditions, loss=loss, steps=steps,
                              batch_size=batch_size, lr=lr, buckets=buckets,
                              n_tokens=n_tokens, seed=seed,
                              callback=lambda *_: advance())
    written = save_tokens(out, result.tokens, force=force, extra={"data": source},
                          negative=result.negative)
    tail = result.history[-min(20, len(result.history)):]
    summary = {"tokens": str(written), "model": backend.name,
               "fingerprint": backend.fingerprint(), "loss": loss, "steps": steps,
               "parameters": int(result.tokens.values.numel()), "seconds": result.seconds,
               "final_loss": sum(tail) / len(tail), "examples": len(conditions),
               "points": list(result.tokens.points)}
    if json:
        print_json(summary)
        return
    print_table(f"soft tokens for {backend.name}", ["", "value"],
                [[k, ", ".join(v) if isinstance(v, list) else v] for k, v in summary.items()])
