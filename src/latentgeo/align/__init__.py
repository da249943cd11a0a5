"""Soft-token alignment (SoftREPA, AGSM): a few learned vectors make a frozen model follow its
condition more closely without guidance.

* :mod:`latentgeo.align.losses` — the objectives, pure torch;
* :mod:`latentgeo.align.tokens` — where tokens go (class-embedding offsets, cross-attention
  context), applying them to a backend, token files;
* :mod:`latentgeo.align.train` — the training loop;
* :mod:`latentgeo.align.data` — (image, condition) pairs from the bundled digits or a folder.
"""

from latentgeo.align.losses import agsm_loss, agsm_targets, keep_mask, softrepa_loss
from latentgeo.align.tokens import SoftTokens, attach, load_tokens, new_tokens, save_tokens
from latentgeo.align.train import LOSSES, AlignResult, train_tokens

__all__ = ["LOSSES", "AlignResult", "SoftTokens", "agsm_loss", "agsm_targets", "attach",
           "keep_mask", "load_tokens", "new_tokens", "save_tokens", "softrepa_loss",
           "train_tokens"]
