"""One adapter per model family behind the protocol of :mod:`.base` (k-diffusion's
``external.py`` idea): ``pixel`` (the bundled models, DDPM/DDIM pipelines), ``sd`` (SD 1.x/2.x),
``sdxl`` (SDXL base), ``sd3`` (SD3 / 3.5) and ``flux`` (FLUX.1 schnell and dev).
:mod:`latentgeo.diffusion.loading` maps pipeline classes to adapters; docs/models/families.md
describes each."""
