"""Size limits checked before memory is taken (torch-free, so the CLI can check options early)."""

#: Largest latent tensor a file may hold or a command may draw, in elements (2**28 =
#: 268,435,456: 1 GiB as float32; 1,000 SDXL-sized or 16,000 SD-1.5-sized seeds).
MAX_ELEMENTS = 2**28
