"""`streamtc` command line: one module per command (group), assembled here.

    streamtc run        watch a video with a VideoLLM, answer questions at their times   (cli/run.py)
    streamtc presets    the built-in architectures                                       (cli/presets.py)
    streamtc bench ...  time ratios and fidelity: vit, pipeline, pruner                   (cli/bench.py)
    streamtc eval ...   accuracy on streaming and offline video QA benchmarks            (cli/eval.py)
    streamtc serve      live streams over HTTP/websockets                                (cli/serve.py)

Every flag builds or selects one validated object (an `STCConfig`, a preset, a source); nothing is
read from the environment. Start-up is kept short: the command modules here import only typer and
rich at the top, `eval` and `serve` (whose modules import torch and their own stacks) are imported
when they are run, and torch, transformers and the models are imported by the command that needs
them. Typed errors (`streamtc.errors`) become one readable line and exit code 2.
"""

from __future__ import annotations

import logging
import signal
from importlib import import_module
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from ..errors import StreamTCError
from . import bench, presets, run
from .common import console


class _LazyGroup(TyperGroup):
    """A command (group) imported when it is run, not when `streamtc --help` lists it (`eval` and
    `serve` import torch, transformers and their own stacks)."""

    def __init__(self, name: str, target: str, help: str) -> None:
        super().__init__(name=name, help=help)
        self._target = target  # "module:attribute" of the Typer app

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        module, _, attribute = self._target.partition(":")
        group = typer.main.get_command(getattr(import_module(module, __package__), attribute))
        return group.make_context(info_name, args, parent=parent, **extra)


class _StreamtcGroup(TyperGroup):
    """The top-level group, with `eval` and `serve` loaded on first use."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_command(_LazyGroup("eval", ".eval:eval_app", help="Benchmark accuracy on streaming and "
                                    "offline video QA benchmarks (see `streamtc eval --help`)."))
        self.add_command(_LazyGroup("serve", ".serve:serve_app", help="Serve live streams to browsers and "
                                    "clients over HTTP/websockets (see `streamtc serve --help`)."))


app = typer.Typer(help="Streaming Token Compression for Hugging Face VideoLLMs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=_StreamtcGroup)
app.command("run")(run.run)
app.command("presets")(presets.presets)
app.add_typer(bench.bench_app, name="bench")


def main() -> None:
    """Entry point: typed errors become one readable line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except StreamTCError as error:
        console.print(f"[red]error:[/] {escape(str(error))}")
        raise SystemExit(2) from None
    except SystemExit:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the outcome is decided (and written): keep its exit code
        raise


__all__ = ["app", "main"]
