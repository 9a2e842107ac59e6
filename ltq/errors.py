"""User-facing errors.

Every mistake a user can make in a config or on the command line raises :class:`ConfigError`
with one line that names the option and the allowed values. The CLI prints it without a
traceback (see :mod:`ltq.cli`).
"""


class ConfigError(ValueError):
    """A configuration or input mistake, reported to the user in one line."""


def check_choice(option: str, value, allowed) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{option}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")
