"""`streamtc serve`: the command. Flags build one `ServerSettings`; FastAPI and uvicorn are
imported only when the server starts (the `serve` extra)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ..serve.server import ServerSettings, check_access, display_url
from ..serve.settings import ServeLimits, ServeMemory, SourcePolicy
from .common import (
    CacherProfileOption, OffloadBudgetOption, OffloadDirOption, RetrieveFramesOption, cacher_profile, stc_setting,
)


def serve(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="Real weights: a local directory or hub id (LLaVA-OneVision, "
                                                   "Qwen2-VL, Qwen2.5-VL, Qwen3-VL). "
                                                   "Overrides --preset.")] = None,
    preset: Annotated[str, typer.Option(help="Built-in architecture with random weights")] = "tiny-llava-ov",
    host: Annotated[str, typer.Option(help="Bind address; anything but loopback needs --token")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    token: Annotated[str | None, typer.Option(help="Bearer token required on every endpoint and websocket",
                                              envvar="STREAMTC_TOKEN")] = None,
    allow_dir: Annotated[list[Path] | None, typer.Option(help="Directory whose video files clients may open "
                                                              "(repeatable)")] = None,
    allow_scheme: Annotated[list[str] | None, typer.Option(help="URL scheme clients may open (rtsp, http, https, "
                                                                "tcp, udp, srt, rtmp), or 'webcam' (repeatable)")]
    = None,
    no_stc: Annotated[bool, typer.Option("--no-stc", help="Streams run without STC unless they ask for it")] = False,
    config: Annotated[Path | None, typer.Option(help="JSON STCConfig for streams that do not set their own")] = None,
    cacher: CacherProfileOption = None,
    max_streams: Annotated[int, typer.Option(help="Open streams at most")] = ServeLimits.max_streams,
    max_queue_frames: Annotated[int, typer.Option(help="Frames waiting per stream at most")]
    = ServeLimits.max_queue_frames,
    max_upload_bytes: Annotated[int, typer.Option(help="Bytes per uploaded frame or request at most")]
    = ServeLimits.max_upload_bytes,
    max_frame_side: Annotated[int, typer.Option(help="Pixels per frame side at most")] = ServeLimits.max_frame_side,
    max_question_chars: Annotated[int, typer.Option(help="Characters per question at most")]
    = ServeLimits.max_question_chars,
    max_new_tokens: Annotated[int, typer.Option(help="Answer tokens a client may request at most")]
    = ServeLimits.max_new_tokens,
    max_model_views: Annotated[int, typer.Option(help="Distinct STC settings (model views) at most")]
    = ServeLimits.max_model_views,
    memory: Annotated[str, typer.Option(help="LLM memory of streams that choose none: full (every token), window "
                                             "(the newest --window-tokens), retrieval (the window, older frames "
                                             "offloaded and retrieved per question), streaming-vlm")] = "full",
    window_tokens: Annotated[int, typer.Option(help="Window of the window and retrieval memories for streams "
                                                    "that set none (tokens)", min=1)] = ServeMemory.window_tokens,
    retrieve_frames: RetrieveFramesOption = ServeMemory.retrieve_frames,
    offload_dir: OffloadDirOption = None,
    offload_budget: OffloadBudgetOption = None,
    num_layers: Annotated[int | None, typer.Option(help="Vision tower depth override for presets")] = None,
    text_layers: Annotated[int | None, typer.Option(help="Language model depth override for VLM presets",
                                                    min=1)] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads of the model worker")] = None,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    ray: Annotated[bool, typer.Option("--ray", help="Run the model as Ray Serve replicas")] = False,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray)")] = 2,
    ray_address: Annotated[str | None, typer.Option(help="Existing Ray cluster (default: a local one on "
                                                         "127.0.0.1)")] = None,
    persist_dir: Annotated[Path | None, typer.Option(help="Save every stream's memory here at shutdown (and on "
                                                          "SIGTERM) and resume the saved streams at start")] = None,
    checkpoint_every: Annotated[float | None, typer.Option(help="With --persist-dir, also save each changed stream "
                                                                "this often (seconds; default 30; 0: only at "
                                                                "shutdown): a crash loses at most this much")] = None,
    allow_origin: Annotated[list[str] | None, typer.Option(help="Browser origin (scheme://host:port) besides the "
                                                                "server's own whose pages may open the websockets "
                                                                "and change streams (repeatable)")] = None,
) -> None:
    """Serve live streams on one loaded model: HTTP/websocket API, a web page at /, OpenAI-style chat."""
    if ctx.invoked_subcommand is not None:  # `streamtc serve loadtest ...`
        return
    logging.getLogger("streamtc.serve").setLevel(logging.INFO)  # start-up and shutdown lines
    check_access(host, token)  # refused at once: the memory settings below import torch
    if no_stc and (config is not None or cacher is not None):
        raise typer.BadParameter("--config and --cacher set up STC; drop --no-stc")
    default_stc = None if no_stc else stc_setting(cacher, config)
    settings = ServerSettings(
        model=model, preset=preset, num_layers=num_layers, text_layers=text_layers, device=device,
        default_stc=default_stc,
        limits=ServeLimits(max_streams=max_streams, max_queue_frames=max_queue_frames,
                           max_upload_bytes=max_upload_bytes, max_frame_side=max_frame_side,
                           max_question_chars=max_question_chars, max_new_tokens=max_new_tokens,
                           max_model_views=max_model_views),
        memory=ServeMemory(kind=memory, window_tokens=window_tokens, retrieve_frames=retrieve_frames,
                           offload_dir=offload_dir, offload_budget=offload_budget),
        sources=SourcePolicy(allow_dirs=tuple(p.expanduser().resolve() for p in allow_dir or ()),
                             allow_schemes=frozenset(s.lower() for s in allow_scheme or ())),
        host=host, port=port, token=token, threads=threads, replicas=replicas if ray else None,
        ray_address=ray_address, persist_dir=persist_dir, checkpoint_every=checkpoint_every,
        allow_origins=tuple(allow_origin or ()),
    )
    _start(settings)


def _start(settings: ServerSettings) -> None:
    """Say where the server listens, then serve until interrupted."""
    from ..serve.server import run

    typer.echo(f"streamtc serve: {settings.model_name} on {display_url(settings.host, settings.port)}"
               + (" (token required)" if settings.token else "")
               + (f", {settings.replicas} Ray Serve replicas" if settings.replicas else ""))
    profile = cacher_profile(settings.default_stc)
    typer.echo("streams without their own STC setting: " + ("no STC" if settings.default_stc is None else
               f"STC-Cacher {profile or 'off'}" + (" (a FLOP budget spent where the video changes)" if profile == "robust"
                                                    else "")))
    if settings.model is None:
        typer.echo(f"preset {settings.preset!r} has random weights: answers are meaningless. Use --model for real "
                   "weights.")
    run(settings)


def loadtest(
    url: Annotated[str | None, typer.Option(help="A running server (default: start one per variant on a free "
                                                 "port of 127.0.0.1)")] = None,
    token: Annotated[str | None, typer.Option(help="Bearer token of --url", envvar="STREAMTC_TOKEN")] = None,
    streams: Annotated[list[int] | None, typer.Option(help="Concurrent streams (repeatable: a sweep, each count "
                                                           "on the same servers) [default: 8]", min=1)] = None,
    duration: Annotated[float, typer.Option(help="Seconds per variant", min=0.1)] = 120.0,
    question_every: Annotated[float, typer.Option(help="Seconds between a stream's questions", min=0.1)] = 10.0,
    source: Annotated[str, typer.Option(help="Clip every stream reads (looped)")] = "demo",
    fps: Annotated[float, typer.Option(help="Frames sampled per second of video")] = 2.0,
    realtime: Annotated[bool, typer.Option("--realtime", help="Pace the clip at its own speed (default: as fast "
                                                              "as the model takes frames)")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length", min=1)] = 16,
    stc: Annotated[str, typer.Option(help="STC of the streams: default (the server's) or off")] = "default",
    compare: Annotated[bool, typer.Option("--compare", help="Run with STC, then without (a server each)")] = False,
    preset: Annotated[str, typer.Option(help="Preset of a started server")] = "tiny-llava-ov",
    num_layers: Annotated[int | None, typer.Option(help="Vision tower depth of a started server's preset")] = None,
    text_layers: Annotated[int | None, typer.Option(help="Language model depth of a started server's preset")] = None,
    cacher: CacherProfileOption = None,
    threads: Annotated[int | None, typer.Option(help="torch threads of a started server")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON here")] = None,
) -> None:
    """Load test: N concurrent looping file streams and a question per stream every few seconds;
    reports per variant errors, answer latency p50/p95, frames per second per stream and server RSS."""
    from ..serve.load import LoadSpec, run_loadtest

    if stc not in ("default", "off"):
        raise typer.BadParameter(f"--stc must be default or off, got {stc!r}")
    spec = LoadSpec(duration=duration, question_every=question_every, source=source, fps=fps,
                    realtime=realtime, max_new_tokens=max_new_tokens)
    server_args = ["--preset", preset] + (["--num-layers", str(num_layers)] if num_layers else []) + (
        ["--text-layers", str(text_layers)] if text_layers else []) + (["--cacher", cacher] if cacher else []) + (
        ["--threads", str(threads)] if threads else [])
    run_loadtest(spec, ["default", "off"] if compare else [stc], url=url, token=token, server_args=server_args,
                 output=output, stream_counts=streams or [LoadSpec.streams])


# The command as its own app, so that `streamtc serve` is imported on first use (streamtc.cli); its
# callback serves, `streamtc serve loadtest` measures a server.
serve_app = typer.Typer(add_completion=False)
serve_app.callback(invoke_without_command=True)(serve)
serve_app.command("loadtest")(loadtest)

__all__ = ["loadtest", "serve", "serve_app"]
