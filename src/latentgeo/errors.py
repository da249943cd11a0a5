"""One exception family. The CLI turns any ``LatentgeoError`` into one line on stderr, exit 2."""


class LatentgeoError(Exception):
    """Base class; its message is a single line meant for the user."""


class InputError(LatentgeoError):
    """A user-supplied file or value is missing, unreadable or invalid."""


class ShapeError(InputError):
    """Tensors that must agree in shape do not."""


class OutputExistsError(LatentgeoError):
    """An output path exists and overwriting was not requested.

    ``path`` is set when passing ``force=True`` would replace it (the CLI then names its own
    flag, ``--force``); None when the path cannot be replaced (a directory, say)."""

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


def exists_error(path: object) -> OutputExistsError:
    """The library's refusal to replace an existing file ``path`` without ``force=True``."""
    return OutputExistsError(f"{path}: exists (pass force=True to replace it)", path=path)


class ModelError(LatentgeoError):
    """A model cannot be loaded, or does not fit the seeds it is given."""
