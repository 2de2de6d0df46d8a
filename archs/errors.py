"""One exception type for every user-facing configuration or input problem."""


class ConfigError(ValueError):
    """A bad config or input, detected before any compilation. The message names the fix."""
