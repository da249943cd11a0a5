"""Every option of the ``latentgeo`` CLI, declared once: one flag, one meaning, every command.

How a new command (``optimize``, ``align``, ...) declares its options
--------------------------------------------------------------------
1. One module per command, ``latentgeo/cli/NAME.py``, registered in ``COMMANDS`` in
   ``latentgeo/cli/__init__.py``; the function's docstring is its help text.
2. Parameters take their type from the aliases below: ``output: Output``, ``steps: Steps =
   None``, ``method: Annotated[InterpolationMethod, MethodOption] = "nao"`` ... A flag named here
   means the same thing everywhere. Need a flag that is not here and that another command could
   use? Add its alias here (with its meaning in the table below), not in the command module.
   Never reuse a name below for another meaning (optimiser steps are ``--max-iters``, not
   ``--steps``).
3. Method choices are ``Literal`` types built from the torch-free tables in
   ``latentgeo/cli/names.py``; a new registry gets a tuple there and a line in the equality test
   (``tests/test_cli_options.py``).
4. The module is imported for every ``--help``, so it imports no torch, numpy, diffusers or
   matplotlib at the top: import them (and ``latentgeo.io``, the math core, ...) inside the
   command function. ``tests/test_processes.py`` checks ``--help`` of every registered command
   in a fresh process.
5. Refuse bad values by raising ``latentgeo.errors.InputError`` with one line that names the
   flag as typed (``"--points 1: a path needs at least 2 points"``); ``guard`` turns it into
   ``error: ...`` and exit 2. Typer's own usage errors are reformatted the same way (one
   ``error:`` line, one ``Usage:`` hint) by :class:`latentgeo.cli.LatentgeoGroup`.
6. Write latents through ``latentgeo.io`` (``save_latent`` / ``save_latent_set`` /
   ``atomic_write``): plan every output name and check every target before the first write.

Flag meanings
-------------
=====================  ===========================================================================
``-o/--output``        where results go: a latent file (.pt/.safetensors) or a folder (trailing /)
``--format``           file format of latents written into a folder: safetensors (default) or pt
``-m/--method``        the algorithm, by its registry name (choices listed in --help)
``--steps``            diffusion (DDIM) steps of rendering/inversion; default: the model's
``--points``           points on an interpolation path, endpoints included
``--max-iters``        iteration cap of an iterative optimiser
``-n/--num``           how many seeds to draw
``--seed``             random seed of torch.Generator (CPU), 0 <= seed < 2**63
``--model``            'bundled', a diffusers pipeline id or a local folder (no downloads)
``--device``           cpu, cuda, cuda:N or mps
``--dtype``            network dtype: float32, float16 or bfloat16
``--prompt``           text prompt (text-to-image models)
``--class``            class label (the bundled digit model: 0-9)
``--guidance``         classifier-free guidance scale (default: the model's; 1 = none)
``--batch-size``       seeds or images per network call (and per streamed chunk of a job)
``--height/--width``   image size in pixels (default: the model's; multiples checked per family)
``--offload``          keep the networks on the CPU, each moved to --device only while it runs
``--shard``            I/N: shard I of N of the sorted inputs (job arrays; composes with torchrun)
``--render``           also render the latents into this folder (PNGs)
``--soft-tokens``      a token file from ``latentgeo align`` applied to every network call
``--alpha``            family-wise false-alarm rate of the Gaussianity verdict
``--json``             results as JSON on stdout (strict JSON: no NaN or Infinity)
``--force``            replace existing outputs
=====================  ===========================================================================
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import typer

from latentgeo.cli import names

#: Largest --seed: torch.Generator.manual_seed takes a 64-bit integer.
MAX_SEED = 2**63 - 1
#: Largest --steps: far beyond any real schedule (1000 training steps), small enough to refuse
#: a typo before a model loads.
MAX_STEPS = 10_000

# -- choices, from the torch-free names table ---------------------------------------------------
InterpolationMethod = Literal[names.INTERPOLATION_METHODS]  # type: ignore[valid-type]
CentroidMethod = Literal[names.CENTROID_METHODS]  # type: ignore[valid-type]
ReprojectionMethod = Literal[names.REPROJECTION_METHODS]  # type: ignore[valid-type]
Spacing = Literal[names.SPACINGS]  # type: ignore[valid-type]
LatentFormat = Literal[names.LATENT_FORMATS]  # type: ignore[valid-type]


def finite(value: float | None) -> float | None:
    """Option callback: refuse NaN and infinities (a usage error naming the flag)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def method_option(what: str) -> typer.models.OptionInfo:
    """``-m/--method`` for a family of methods (``what``: 'interpolation method', ...)."""
    return typer.Option("--method", "-m", help=f"The {what}.")


# -- outputs --------------------------------------------------------------------------------------
Output = Annotated[Path, typer.Option(
    "--output", "-o", help="Output latent file (.pt/.safetensors), or a folder (trailing '/') "
    "for one file per latent.")]
OutputFile = Annotated[Path, typer.Option(
    "--output", "-o", help="Output latent file (.pt/.safetensors).")]
ImageFolder = Annotated[Path, typer.Option("--output", "-o", help="Output folder for the PNGs.")]
Format = Annotated[LatentFormat, typer.Option(
    "--format", help="File format of the latents written into an output folder.")]
Force = Annotated[bool, typer.Option("--force", help="Replace existing outputs.")]
Json = Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")]

# -- randomness and counts ------------------------------------------------------------------------
Seed = Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED,
                                   help="Random seed (torch.Generator on the CPU).")]
Num = Annotated[int, typer.Option("-n", "--num", min=1, help="Number of seeds.")]
#: ``-n`` where it is optional (``optimize``: the start seeds of ``--init``).
NumOptional = Annotated[int | None, typer.Option(
    "-n", "--num", min=1, max=100_000, help="Number of seeds (optimize: how many start seeds "
    "--init makes: the centroid, then the rest shared evenly over the paths).")]
Points = Annotated[int, typer.Option("--points", min=2, max=100_000,
                                     help="Points on the path, endpoints included.")]
MaxIters = Annotated[int | None, typer.Option(
    "--max-iters", min=1, max=10_000_000, help="Iteration cap of the iterative optimiser "
    "(nao-reference: default 10,000).")]

# -- models and rendering -------------------------------------------------------------------------
Model = Annotated[str, typer.Option("--model", help="'bundled' (DDPM), 'bundled-flow' "
                                    "(rectified flow), or any diffusers pipeline id "
                                    "or local path (weights must be cached; no downloads).")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Network dtype: float32, float16, "
                                    "bfloat16 (geometry always runs in float32/64).")]
Steps = Annotated[int | None, typer.Option("--steps", min=1, max=MAX_STEPS,
                                           help="Diffusion (DDIM) steps (default: the model's).")]
Prompt = Annotated[str | None, typer.Option("--prompt", help="Text prompt (text-to-image "
                                            "models).")]
ClassLabel = Annotated[int | None, typer.Option("--class", help="Digit class 0-9 "
                                                "(bundled model; default: unconditional).")]
Guidance = Annotated[float | None, typer.Option(
    "--guidance", callback=finite,
    help="Classifier-free guidance scale (default: the model's; 1 = none).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, max=65_536,
                                        help="Seeds or images per network call.")]
Shard = Annotated[str | None, typer.Option(
    "--shard", help="Do shard I of N of the sorted inputs (I/N, counted from 0; e.g. a job "
    "array's index). Under torchrun/accelerate each rank takes its part of that shard.",
    show_default=False)]
Height = Annotated[int | None, typer.Option(
    "--height", min=8, max=16_384, help="Image height in pixels (default: the model's; SD/SDXL "
    "take multiples of 8, SD3/FLUX of 16; the bundled models only their own 32).")]
Width = Annotated[int | None, typer.Option(
    "--width", min=8, max=16_384, help="Image width in pixels (as --height).")]
Offload = Annotated[bool, typer.Option(
    "--offload", help="Keep the networks on the CPU and move each to --device only while it "
    "runs (diffusers' model CPU offload, for large models on small GPUs; needs a GPU).")]
Render = Annotated[Path | None, typer.Option(
    "--render", help="Also render the latents with --model into this folder (PNGs).")]
SoftTokensFile = Annotated[Path | None, typer.Option(
    "--soft-tokens", help="Soft tokens trained by `latentgeo align` for this model "
    "(.safetensors); applied to every network call, both guidance branches.")]

# -- statistics -----------------------------------------------------------------------------------
Alpha = Annotated[float, typer.Option("--alpha", min=1e-12, max=0.5, callback=finite,
                                      help="Family-wise false-alarm rate of the verdict.")]
