"""Shared fixtures: tiny random models of real architectures, synthetic and real footage, live streams.

Models are built once per test session and handed to each test through a guard that fails the
test which leaves one patched (a Cacher or ToMe still attached, a module class swapped), so that
sharing them cannot leak state from one test file into another. Test tiers: `gpu` tests run only
where CUDA exists (skipped otherwise); `slow` tests run in the default suite too (CI runs every
test that needs no GPU) and can be left out locally with `-m "not slow"`.
"""

from __future__ import annotations

import faulthandler
import io
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from streamtc.presets import build_model
from streamtc.sources import builtin_clip_path

torch.set_num_threads(min(2, os.cpu_count() or 1))

RATE = 25  # frames per second of the bikes clip and of the live test streams


# STREAMTC_GPU_DRY_RUN=1 runs the `gpu` tier on the CPU, to check the tests' own logic on a machine
# without a GPU (`scripts/gpu-check.sh --dry-run`); the tests that need CUDA itself still skip.
GPU_DRY_RUN = os.environ.get("STREAMTC_GPU_DRY_RUN") == "1"


# A process that does not exit EXIT_LIMIT_S after its last test (a thread left blocked keeps Python
# from exiting) fails the run with every thread's stack instead of running into CI's time limit
# with nothing said; a test that hangs does the same after `faulthandler_timeout` (pyproject.toml).
EXIT_LIMIT_S = 120
REAL_STDERR = pytest.StashKey[io.TextIOWrapper]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REAL_STDERR] = os.fdopen(os.dup(sys.stderr.fileno()), "w")  # output is not captured here


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.dump_traceback_later(EXIT_LIMIT_S, exit=True, file=config.stash[REAL_STDERR])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where CUDA exists (or in the dry run); everything else runs everywhere."""
    if torch.cuda.is_available() or GPU_DRY_RUN:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def gpu() -> torch.device:
    """The device of the `gpu` tier: the first CUDA device (the CPU in the dry run)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def cuda_only(gpu: torch.device) -> None:
    """Skip in the dry run: the test checks something only CUDA has (graphs, its memory counters)."""
    if gpu.type != "cuda":
        pytest.skip("needs CUDA itself (dry run on the CPU)")


# -- models ----------------------------------------------------------------------------------------


def _layout(model: torch.nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


def _guarded(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Yield the shared model; then fail the test that left it patched or its modules changed."""
    layout = _layout(model)
    yield model
    patched = [name for name, module in model.named_modules() if "forward" in module.__dict__]
    assert not patched, f"a test left these modules patched (detach or remove what it attached): {patched[:4]}"
    assert _layout(model) == layout, "a test left the shared model's modules changed"


@pytest.fixture(scope="session")
def llava_ov_model() -> torch.nn.Module:
    """The tiny LLaVA-OneVision (eager attention, seed 0), built once; for wider-scoped fixtures
    that only read it (tests take `llava_ov`, which checks it is left as found)."""
    return build_model("tiny-llava-ov", attn_implementation="eager")


@pytest.fixture
def llava_ov(llava_ov_model) -> Iterator[torch.nn.Module]:
    """The session's tiny LLaVA-OneVision; the test fails if it leaves the model patched."""
    yield from _guarded(llava_ov_model)


@pytest.fixture(scope="session")
def siglip_model() -> torch.nn.Module:
    """The tiny SigLIP tower (eager attention, seed 0), built once (tests take `siglip`)."""
    return build_model("tiny-siglip", attn_implementation="eager")


@pytest.fixture
def siglip(siglip_model) -> Iterator[torch.nn.Module]:
    """The session's tiny SigLIP tower; the test fails if it leaves the tower patched."""
    yield from _guarded(siglip_model)


# -- footage ---------------------------------------------------------------------------------------


def drifting_frames(count: int, seed: int = 0, size: tuple[int, int] = (60, 80)) -> np.ndarray:
    """A drifting noisy scene, uint8 [F, H, W, 3]: neighbouring frames are similar, as in a stream."""
    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 256, (size[0], size[1] + 4 * count, 3)).astype(np.int16)
    frames = [scene[:, 4 * i : 4 * i + size[1]] + rng.integers(-12, 13, (*size, 3)) for i in range(count)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def make_frames() -> Callable[..., np.ndarray]:
    """`make_frames(count, seed=0, size=(60, 80))`: a drifting synthetic scene (see `drifting_frames`)."""
    return drifting_frames


def remux_bikes(path: Path, **output_options: Any) -> Path:
    """The bikes clip's video packets, unchanged, in a new container at `path` (`av.open` options:
    format=..., options={...})."""
    with av.open(str(builtin_clip_path())) as src, av.open(str(path), "w", **output_options) as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return path


@pytest.fixture(scope="session")
def transport_stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bikes clip remuxed into an MPEG transport stream (.ts), which declares no duration; read only."""
    return remux_bikes(tmp_path_factory.mktemp("footage") / "bikes.ts", format="mpegts")


# -- live streams on 127.0.0.1 ---------------------------------------------------------------------


class Cable(io.RawIOBase):
    """The sender's end of a TCP connection; `cut()` drops it like a pulled cable (later writes vanish)."""

    def __init__(self, connection: socket.socket) -> None:
        super().__init__()
        self.connection: socket.socket | None = connection

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        if self.connection is not None:
            self.connection.sendall(data)
        return len(data)

    def cut(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class MpegTsSender(threading.Thread):
    """Serves frames as a 25 fps H.264 MPEG-TS stream to the first client of a 127.0.0.1 port.

    stop_after: frames sent before the sender stops (None: all, then a proper end of stream);
    stall_s: after stopping, how long at most the connection stays open but silent before it is
    cut; `release()` (the reader is done) cuts it sooner. `cut_while_reading` records whether the
    cut came before the release: event order, not durations, so it holds on a loaded machine.
    """

    def __init__(self, frames: list[np.ndarray], stop_after: int | None = None, stall_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.frames, self.stop_after, self.stall_s = frames, stop_after, stall_s
        self.server = socket.create_server(("127.0.0.1", 0))  # listening before any client connects
        self.url = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.failure: BaseException | None = None
        self.released = threading.Event()
        self.cut_while_reading: bool | None = None

    def release(self) -> None:
        """The reader is done: cut a stalled connection now."""
        self.released.set()

    def run(self) -> None:
        try:
            connection, _ = self.server.accept()
            cable = Cable(connection)
            with av.open(cable, "w", format="mpegts") as out:
                stream = out.add_stream("libx264", rate=RATE, options={"preset": "ultrafast", "tune": "zerolatency"})
                stream.height, stream.width = self.frames[0].shape[:2]
                stream.pix_fmt = "yuv420p"
                for i, image in enumerate(self.frames[: self.stop_after]):
                    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                    frame.pts = i
                    out.mux(stream.encode(frame))
                if self.stop_after is None:
                    out.mux(stream.encode())
                else:
                    self.released.wait(self.stall_s)
                    self.cut_while_reading = not self.released.is_set()
                    cable.cut()
            cable.cut()
        except BaseException as error:  # reported by the test through `failure`
            self.failure = error
        finally:
            self.server.close()


@pytest.fixture
def mpegts_sender() -> Iterator[Callable[..., MpegTsSender]]:
    """`mpegts_sender(frames, stop_after=None, stall_s=0.0)`: a sender, not started yet; every one
    made is released and joined when the test ends."""
    made: list[MpegTsSender] = []

    def make(frames: list[np.ndarray], stop_after: int | None = None, stall_s: float = 0.0) -> MpegTsSender:
        made.append(MpegTsSender(frames, stop_after, stall_s))
        return made[-1]

    yield make
    for sender in made:
        sender.release()
        sender.server.close()  # a sender still waiting for its client stops waiting
        if sender.is_alive():
            sender.join(timeout=10)
