"""`streamtc run` under bad input and faults: refused at once, or ended with every answer kept.

Faults are injected over the whole command, in a subprocess as a user runs it: a file whose decoding
fails mid-way, a cut transport stream, a live stream that stalls (served on 127.0.0.1 by the test),
and Ctrl-C (SIGINT) at a random moment. In every case the `--output` file must be valid JSON holding
every answer printed so far, and the exit code must say what happened.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
from typer.testing import CliRunner

from streamtc.cli import app
from streamtc.cli import common
from streamtc.cli.run import EXIT_CODES
from streamtc.errors import ConfigError
from streamtc.sources import builtin_clip_path

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")
ANSWER_LINE = re.compile(r"^\s*([\d.]+)s \[(.+?)\] Q: (.*)$", re.MULTILINE)


def streamtc(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`streamtc ARGS` as a user runs it (the console entry point), output not wrapped."""
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", "from streamtc.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def printed_answers(stdout: str) -> list[tuple[float, str, str]]:
    """(seconds, variant, question) of every answer printed."""
    return [(float(s), name, question) for s, name, question in ANSWER_LINE.findall(stdout)]


def check_record(path: Path, stdout: str, returncode: int) -> dict:
    """The output file is valid JSON, holds every printed answer, and agrees with the exit code."""
    record = json.loads(path.read_text())
    assert record["exit_code"] == EXIT_CODES[record["status"]] == returncode, (record["status"], stdout)
    saved = [(a["seconds"], name, a["question"]) for name, answers in record["answers"].items() for a in answers]
    printed = printed_answers(stdout)
    assert all(answer in saved for answer in printed), stdout  # (one may be saved just before its printing)
    assert len(saved) - len(printed) <= 1, stdout
    assert f"status: {record['status']} (exit code {returncode})" in stdout
    return record


@pytest.fixture(scope="module")
def cut_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bikes clip with its index first, cut inside the packet of frame 150: decoding fails after
    the frame at 5 s is sampled."""
    folder = tmp_path_factory.mktemp("cut")
    whole = folder / "faststart.mp4"
    with av.open(str(builtin_clip_path())) as src, av.open(str(whole), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    with av.open(str(whole)) as container:
        offsets = [p.pos for p in container.demux(video=0) if p.size]
    cut = folder / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: offsets[150] + 100])
    return cut


# -- refused before anything is built --------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--ask", "nan:first", "--ask", "2:second"], "must be a finite number of seconds >= 0, got 'nan'"),
    (["--ask", "inf:first"], "got 'inf'"),
    (["--ask", "-1:first"], "got '-1'"),
    (["--ask", "2:which?|only one"], "needs two options or more"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--fps", "nan"], "must be a finite number > 0"),
    (["--max-seconds", "nan"], "must be a finite number >= 0"),
    (["--timeout", "0"], "must be a finite number > 0"),
])
def test_bad_times_and_sizes_are_refused_while_parsing(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["run", "demo", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())  # the error box unwrapped
    assert "random weights" not in result.output  # refused before any model exists


@pytest.mark.parametrize("args, message", [
    (["--preset", "nosuch"], "--preset 'nosuch' is not a preset; `run` takes: "),
    (["--preset", "tiny-siglip"], "is a vision tower only"),
    (["--model", "{empty}"], "no config.json in this directory"),
    (["--model", "{empty}/missing"], "no such directory"),
    (["--config", "{notjson}"], "not JSON"),
    (["--config", "{list}"], "must hold a JSON object"),
    (["{empty}"], "is a directory; give a video file"),
    (["ftp://example.org/clip.mp4"], "ftp:// is not a supported stream"),
    (["foo://clip"], "foo:// is not a supported stream"),
])
def test_bad_models_configs_and_sources_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notjson.json").write_text("cacher: {cache_interval: 2}\n")
    (tmp_path / "list.json").write_text("[1, 2]\n")
    paths = {"empty": tmp_path / "empty", "notjson": tmp_path / "notjson.json", "list": tmp_path / "list.json"}
    args = [a.format(**paths) for a in args]
    video = [] if not args[0].startswith("--") else ["demo"]
    result = streamtc("run", *video, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert "random weights" not in result.stdout  # the error comes first
    if "nosuch" in args:
        listed = result.stdout.split("takes: ")[1]
        assert "tiny-llava-ov" in listed and "tiny-siglip" not in listed and "clip-l14-336" not in listed


def test_a_hub_id_without_network_fails_at_once_and_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConfigError, match="cannot be reached to download it.*--model DIR"):
        common.check_model("streamtc-tests/no-such-model")
    result = runner.invoke(app, ["run", "demo", "--model", "streamtc-tests/no-such-model"])
    assert isinstance(result.exception, ConfigError) and "random weights" not in result.output


def test_a_saved_model_that_cannot_load_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llava_onevision"}')  # no weights beside it
    result = streamtc("run", "demo", "--model", str(tmp_path), "--max-seconds", "1")
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert f"--model {tmp_path}: cannot be loaded" in " ".join(result.stdout.split())


# -- questions at awkward times ---------------------------------------------------------------------


def test_a_question_past_the_end_is_asked_at_the_end_with_a_note(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", "demo", "--max-seconds", "3", "--ask", "2:early?", "--ask", "30:late?",
                                 "--ask", "3:at the end?", "--max-new-tokens", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    answers = json.loads(out.read_text())["answers"]["STC"]
    assert [(a["seconds"], a["frames"], a["note"]) for a in answers[:2]] == [(2.0, 3, None), (3.0, 4, None)]
    late = answers[2]
    assert late["seconds"] == 30.0 and late["frames"] == 4
    assert late["note"] == "asked at 3.0 s, the last frame received: --max-seconds 3 ends the stream before 30 s"
    assert late["note"] in " ".join(result.output.split())


def test_a_question_past_the_end_of_the_whole_video_says_the_video_ends(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", "demo", "--no-stc", "--fps", "0.5", "--max-seconds", "60", "--ask", "30:late?",
                                 "--max-new-tokens", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    [late] = json.loads(out.read_text())["answers"]["no STC"]
    assert late["note"] == "asked at 8.0 s, the last frame received: the video ends before 30 s"  # not --max-seconds


# -- faults over the whole run -----------------------------------------------------------------------


def test_decoding_failure_midway_keeps_every_answer_and_asks_the_decoded_ones(cut_mp4: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    result = streamtc("run", str(cut_mp4), "--compare", "--ask", "2:two?", "--ask", "5:five?", "--ask", "8:eight?",
                      "--max-new-tokens", "2", "--output", str(out))
    record = check_record(out, result.stdout, 3)
    assert record["status"] == "source_failed" and record["stream"]["frames"] == 6
    for answers in record["answers"].values():
        assert [(a["seconds"], a["frames"]) for a in answers] == [(2.0, 3), (5.0, 6), (8.0, 6)]
        assert answers[1]["note"] is None  # its frame was decoded before the failure: asked as usual
        assert "the stream stopped before 8 s" in answers[2]["note"]
    assert "the video ended early" in result.stdout and "decoding failed" in result.stdout
    assert "STC / no STC" in result.stdout  # the summary is printed


def test_a_cut_transport_stream_ends_early_with_a_note(tmp_path: Path, transport_stream: Path) -> None:
    data = transport_stream.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[: len(data) // 2 + 100])
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", str(cut), "--ask", "1:one?", "--ask", "8:eight?", "--max-new-tokens", "1",
                                 "--output", str(out)])
    assert result.exit_code == 3, result.output
    record = json.loads(out.read_text())
    assert record["status"] == "source_failed" and record["stream"]["last_time"] == 4.0
    assert "transport-stream packet" in record["notes"][0] and "the video ended early" in result.output
    assert [a["note"] is None for a in record["answers"]["STC"]] == [True, False]


def test_a_stalled_live_stream_ends_early_and_keeps_its_answers(tmp_path: Path, mpegts_sender) -> None:
    import numpy as np

    frames = [np.full((68, 160, 3), 8 * i % 256, np.uint8) for i in range(100)]
    sender = mpegts_sender(frames, stop_after=60, stall_s=120.0)  # 2.4 s of video, then silence
    sender.start()
    out = tmp_path / "run.json"
    # a 3 s read timeout: long next to a starved sender thread's pauses on a loaded machine
    result = streamtc("run", sender.url, "--timeout", "3", "--ask", "1:one?", "--ask", "3:three?",
                      "--max-new-tokens", "1", "--output", str(out))
    assert sender.cut_while_reading is None  # still stalling when the run ended: the timeout ended it
    record = check_record(out, result.stdout, 4)
    assert record["status"] == "ended_early" and "no data for 3.0 s" in record["stream"]["error"]
    first, second = record["answers"]["STC"]
    assert first["note"] is None and first["frames"] == 2
    assert "the stream stopped before 3 s" in second["note"]


def test_a_live_stream_is_opened_once_the_model_is_built_and_its_failure_is_recorded(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again at once: nothing listens there
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", f"tcp://127.0.0.1:{port}", "--timeout", "1", "--ask", "1:one?",
                                 "--output", str(out)])
    assert result.exit_code == 2 and f"tcp://127.0.0.1:{port}: cannot open" in " ".join(result.output.split())
    record = json.loads(out.read_text())
    assert record["status"] == "error" and [q["seconds"] for q in record["unanswered"]] == [1.0]


def _interrupt(args: list[str], out: Path, delay: float, after_answers: int = 0) -> subprocess.CompletedProcess:
    """Run `streamtc run ARGS`, send SIGINT `delay` s after the run started (after its first record,
    or after `after_answers` answers were written), and return the finished process."""
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-c", "from streamtc.cli import main; main()", "run", *args,
                                "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if sum(map(len, json.loads(out.read_text())["answers"].values())) >= after_answers:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow  # a CLI subprocess run to an answer, then interrupted
def test_ctrl_c_after_an_answer_keeps_it_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    result = _interrupt(["demo", "--compare", "--ask", "1:one?", "--ask", "9:nine?", "--max-new-tokens", "2"],
                        out, delay=0.0, after_answers=2)  # both variants answered 1 s
    record = check_record(out, result.stdout, 130)
    assert record["status"] == "interrupted" and "Traceback" not in result.stdout + result.stderr
    assert [a["seconds"] for a in record["answers"]["STC"]] == [1.0]
    assert [q["seconds"] for q in record["unanswered"]] == [9.0]
    assert "not asked:" in result.stdout and "interrupted (Ctrl-C)" in result.stdout


@pytest.mark.slow  # a CLI subprocess interrupted up to 10 s in
@pytest.mark.parametrize("seed", [0, 1])
def test_ctrl_c_at_a_random_moment_leaves_a_valid_record(tmp_path: Path, seed: int) -> None:
    """SIGINT anywhere from model building to the summary: the record stays valid JSON with every
    answer printed, and the exit code is 130 (or 0 if the run finished first)."""
    delay = random.Random(seed).uniform(0.0, 10.0)
    out = tmp_path / "run.json"
    result = _interrupt(["demo", "--compare", "--ask", "1:one?", "--ask", "4:four?|yes|no", "--ask", "7:seven?",
                         "--max-new-tokens", "2"], out, delay=delay)
    assert result.returncode in (0, 130), (delay, result.stdout, result.stderr)
    check_record(out, result.stdout, result.returncode)
    assert "Traceback" not in result.stdout + result.stderr
