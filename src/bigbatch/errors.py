"""The user-facing error type. Imports nothing of bigbatch, so any module can raise it."""


class ConfigError(ValueError):
    """A user-facing problem (a flag, a file, a row); its message is one line naming the fix."""
