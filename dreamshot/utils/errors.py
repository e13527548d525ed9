"""User-facing errors: the CLI prints them as one line and exits with their `exit_status` (no traceback):
2 for a fault in the input, 130 for a command the user interrupted, 143 for one a scheduler terminated."""


class DreamShotError(Exception):
    """A fault in user input (config, data, weights, paths), reported as one line naming what and where."""

    exit_status = 2


class ConfigError(DreamShotError):
    """An invalid configuration: unknown key, wrong type, or contradictory values. `key` is the config key at
    fault when there is one: the loader then adds which file (or the command line) set it."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DataError(DreamShotError):
    """A fault in a manifest, an image or a mask."""


class WeightsError(DreamShotError):
    """Missing or malformed model weights."""


class ResourceError(DreamShotError):
    """A run that cannot go on with the resources it has (e.g. a story that does not fit in GPU memory)."""


class Interrupted(DreamShotError):
    """The user stopped a command (Ctrl-C); the message says what was kept and how to continue."""

    exit_status = 130


class Terminated(Interrupted):
    """A command stopped by SIGTERM (a scheduler's preemption or time limit, `scancel`, Kubernetes). 143 = 128 + 15,
    the status of a process SIGTERM ends, which schedulers and shells read as terminated, not as success."""

    exit_status = 143
