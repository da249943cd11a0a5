"""One adapter per model family behind the protocol of :mod:`.base` (k-diffusion's
``external.py`` idea): ``pixel`` (the bundled models, DDPM/DDIM pipelines), ``sd`` (SD 1.x/2.x).
:mod:`latentgeo.diffusion.loading` maps pipeline classes to adapters."""
