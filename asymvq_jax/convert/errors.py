"""Errors the converter raises; all are ValueErrors that name the problem."""


class ConvertError(ValueError):
    """Base class of every converter error."""


class UnknownFormatError(ConvertError):
    """The file or folder is in no layout we read."""


class CorruptFileError(ConvertError):
    """A checkpoint file is truncated, corrupt or not what its name says."""


class PickleNotAllowedError(ConvertError):
    """A pickled checkpoint was given without allow_pickle=True."""


class KeyMismatchError(ConvertError):
    """Missing and/or unexpected keys; both lists are kept on the error."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected


class ShapeMismatchError(ConvertError):
    """Tensors whose shape differs from the model's; `mismatches` holds (key, expected, got)."""

    def __init__(self, message: str, mismatches: list[tuple[str, tuple, tuple]]):
        super().__init__(message)
        self.mismatches = mismatches
