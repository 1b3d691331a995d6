"""User-facing errors: one line naming the file or field and what was expected."""


class DscoderError(Exception):
    """A mistake in the user's input (a path, a config value, a checkpoint). The CLI prints it as one line."""


class ConfigError(DscoderError, ValueError):
    """A config field is missing, unknown, of the wrong type or out of range."""


class CheckpointError(DscoderError):
    """A checkpoint directory is missing files, holds unexpected keys or tensors of the wrong shape."""
