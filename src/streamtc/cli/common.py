"""What the command modules share: the console, and reading an `STCConfig` from a --config file."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..config import STCConfig
from ..errors import ConfigError

console = Console()


def read_stc_config(path: Path) -> STCConfig:
    """The STCConfig of a --config JSON file, with the file and the problem named on failure."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot be read ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path}: not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must hold a JSON object like {{\"cacher\": {{...}}, \"pruner\": {{...}}}}")
    try:
        return STCConfig.from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"--config {path}: {error}") from None


__all__ = ["console", "read_stc_config"]
