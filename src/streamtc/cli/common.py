"""What the command modules share: the console, reading an `STCConfig` from a --config file, and
the memory options of `run` and `eval run` (`serve` takes the retrieval ones)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..config import STCConfig
from ..errors import ConfigError

console = Console()

MemoryOption = Annotated[str | None, typer.Option(
    help="The stream's LLM memory: full (every token), window (the newest --window-tokens, older frames "
         "forgotten), retrieval (ReKV: a window, older frames offloaded and retrieved per question) or "
         "streaming-vlm (StreamingVLM's window of chunks and text rounds; the livecc protocol). "
         "Default: window when --window-tokens is given, else full")]
WindowTokensOption = Annotated[int | None, typer.Option(
    help="Window of the window and retrieval memories, in visual tokens (default 15000)", min=1)]
RetrieveFramesOption = Annotated[int, typer.Option(
    help="Retrieval memory: frame blocks each LLM layer retrieves per question", min=1)]
OffloadDirOption = Annotated[Path | None, typer.Option(
    help="Retrieval memory: keep offloaded blocks on disk under this directory, a private directory per stream "
         "(default: host memory)")]
OffloadBudgetOption = Annotated[int | None, typer.Option(
    help="Retrieval memory on disk: bytes of block files kept per stream at most, the oldest deleted first", min=0)]


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


__all__ = ["MemoryOption", "OffloadBudgetOption", "OffloadDirOption", "RetrieveFramesOption", "WindowTokensOption",
           "console", "read_stc_config"]
