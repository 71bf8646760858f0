"""What the command modules share: the console, reading an `STCConfig` from a --config file, the
checks of --model and --preset (quick: nothing heavy is imported), and the memory options of `run`
and `eval run` (`serve` takes the retrieval ones)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.console import Console

from ..config import CacherConfig, STCConfig
from ..errors import ConfigError

console = Console()

# The `--memory` names of `streamtc.memory.MEMORIES`, here so that a bad name is refused without
# importing the memories (and torch); tests/test_cli_startup.py holds the two equal.
MEMORY_KINDS = ("full", "window", "retrieval", "streaming-vlm")


def _memory_kind(value: str | None) -> str | None:
    if value is not None and value not in MEMORY_KINDS:
        raise typer.BadParameter(f"choose from {', '.join(MEMORY_KINDS)}, got {value!r}")
    return value


MemoryOption = Annotated[str | None, typer.Option(
    callback=_memory_kind,
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


CacherProfileOption = Annotated[str | None, typer.Option(
    "--cacher", help="STC-Cacher setting: 'robust' (the default; a FLOP budget equal to the paper's N=2 schedule, "
                     "spent where the video changes, guided by the decoder's motion vectors; docs/algorithms.md) or "
                     "'paper' (the paper's fixed N=2 schedule); --config sets it instead")]
CACHER_PROFILES = ("robust", "paper")


def stc_setting(profile: str | None, config: Path | None, default: str = "robust") -> STCConfig:
    """The STCConfig a command runs: a --config file's, else the --cacher profile's (default
    `default`) with the paper's Pruner."""
    if profile is not None and profile not in CACHER_PROFILES:
        raise typer.BadParameter(f"--cacher takes {' or '.join(CACHER_PROFILES)}, got {profile!r}")
    if config is not None:
        if profile is not None:
            raise typer.BadParameter("--config sets the Cacher; drop --cacher")
        return read_stc_config(config)
    return STCConfig(cacher=CacherConfig.robust()) if (profile or default) == "robust" else STCConfig()


def cacher_profile(stc: STCConfig | None) -> str | None:
    """"robust", "paper" or "custom": which Cacher setting a variant runs (None: no Cacher), for
    summaries and results headers."""
    return None if stc is None or stc.cacher is None else stc.cacher.profile


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


def check_preset(name: str) -> None:
    """Refuse a preset that cannot stream (a vision tower alone), listing those that can (with a language model)."""
    from ..presets import PRESETS

    runnable = [name for name, preset in PRESETS.items() if preset.is_video_llm]
    if name not in runnable:
        kind = "is a vision tower only (for `bench vit`)" if name in PRESETS else "is not a preset"
        raise ConfigError(f"--preset {name!r} {kind}; `run` takes: {', '.join(runnable)}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds."""
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_model(model: str) -> None:
    """A --model directory must hold a saved model; a hub id must be downloadable or cached.

    Without a network, transformers retries the hub for half a minute before it fails; here a
    missing hub fails at once with what to do, and a cached copy is used offline."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--model {model}: is a file; give the directory written by save_pretrained")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {model}: no config.json in this directory; give a directory written by "
                              "save_pretrained (config.json, weights, tokenizer and processor files) or a hub id")
        return
    parts = model.split("/")
    if model.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts):
        raise ConfigError(f"--model {model}: no such directory (and not a hub id such as ORG/NAME)")
    if hub_reachable():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        constants.HF_HUB_OFFLINE = True  # the hub is unreachable: read the cached copy without retrying
        console.print(f"[yellow]the Hugging Face hub cannot be reached: using the cached copy of {model}[/]")
        return
    raise ConfigError(f"--model {model}: not a local directory, and the Hugging Face hub ({constants.ENDPOINT}) "
                      "cannot be reached to download it. Download it where there is a network (`hf download "
                      f"{model} --local-dir DIR`) and pass --model DIR, or run a built-in --preset")


__all__ = ["MEMORY_KINDS", "MemoryOption", "OffloadBudgetOption", "OffloadDirOption", "RetrieveFramesOption", "WindowTokensOption",
           "check_model", "check_preset", "console", "hub_reachable", "read_stc_config"]
