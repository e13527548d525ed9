"""User-facing errors: the CLI prints them as one line and exits with status 2 (no traceback)."""


class DreamShotError(Exception):
    """A fault in user input (config, data, weights, paths), reported as one line naming what and where."""


class ConfigError(DreamShotError):
    """An invalid configuration: unknown key, wrong type, or contradictory values."""


class DataError(DreamShotError):
    """A fault in a manifest, an image or a mask."""


class WeightsError(DreamShotError):
    """Missing or malformed model weights."""


class ResourceError(DreamShotError):
    """A run that cannot go on with the resources it has (e.g. a story that does not fit in GPU memory)."""
