"""One exception family. The CLI turns any ``LatentgeoError`` into one line on stderr, exit 2."""


class LatentgeoError(Exception):
    """Base class; its message is a single line meant for the user."""


class InputError(LatentgeoError):
    """A user-supplied file or value is missing, unreadable or invalid."""


class ShapeError(InputError):
    """Tensors that must agree in shape do not."""


class OutputExistsError(LatentgeoError):
    """An output path exists and overwriting was not requested (``--force``)."""


class ModelError(LatentgeoError):
    """A model cannot be loaded, or does not fit the seeds it is given."""
