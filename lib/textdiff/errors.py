"""The library's error types, in a module that imports nothing heavy (the CLI needs them before torch loads)."""


class DataError(ValueError):
    """Bad input data, with a message that says which file and what is wrong."""


class FeaturesTooLarge(DataError):
    """A run whose diffusion features would not fit the feature cache's memory limit, with nowhere to spill them."""


class ImageTooLarge(DataError):
    """An image whose header promises more pixels than the reader may decode (a server answers 413)."""
