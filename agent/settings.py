"""``ANOMALY_AGENT_<NAME>`` environment settings: the one reader every command and backend shares.

Each command-line option and model setting may be given in the environment instead
(``--max-upload-mb`` -> ``ANOMALY_AGENT_MAX_UPLOAD_MB``), so a container or a systemd unit
configures the tool without a wrapper script. One reader means one set of rules: an unset or
empty variable means the default; the default's type decides how the text is read; a value that
does not read as that type is an error naming the variable, not a silent fallback.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ENV_PREFIX", "SettingError", "env_name", "env_setting"]

ENV_PREFIX = "ANOMALY_AGENT_"


class SettingError(ValueError):
    """An ``ANOMALY_AGENT_*`` variable holds text that does not read as the setting's type."""


def env_name(name: str) -> str:
    """The variable for a setting: ``max-upload-mb`` -> ``ANOMALY_AGENT_MAX_UPLOAD_MB``."""
    return ENV_PREFIX + name.upper().replace("-", "_")


def env_setting(name: str, default: Any) -> Any:
    """The setting's value from the environment, typed like ``default``; ``default`` if unset or empty.

    Raises:
        SettingError: The variable is set to text that is not a ``bool``/``int``/``float`` as the
            default is (the message names the variable and the value).
    """
    var = env_name(name)
    value = os.environ.get(var)
    if value is None or value == "":
        return default
    try:
        if isinstance(default, bool):
            word = value.strip().lower()
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        kind = {bool: "yes/no (1, true, yes, on / 0, false, no, off)", int: "an integer"}.get(type(default), "a number")
        raise SettingError(f"environment variable {var}={value!r} is not {kind}") from None
    return value
