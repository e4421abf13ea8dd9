"""The package's error for a bad serving option (its own module: config, sparse_prefill and the launcher raise it)."""


class ConfigError(ValueError):
    """Bad serving option; the message names the option and the fix."""
