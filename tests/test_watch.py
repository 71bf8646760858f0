"""The stream watch (`streamtc.watch`) and the `run` command around it: events in stream order, the
session's option log-probabilities against a direct reading of the logits, how far an interrupted
stream got as the summary counts it, and what `run` records when it stops early or resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from streamtc.cli import app
from streamtc.factory import SessionSpec
from streamtc.session import StreamingSession
from streamtc.sources import open_source
from streamtc.watch import Answered, Progress, Started, StreamWatch, TimedQuestion

runner = CliRunner()


def frames(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, 48, 64, 3), dtype=np.uint8)


def test_events_come_in_stream_order_and_each_question_sees_its_frames() -> None:
    questions = [TimedQuestion(1.0, "first?"), TimedQuestion(2.0, "which?", ("red", "blue"))]
    watch = StreamWatch({"no STC": SessionSpec(preset="tiny-llava-ov")}, questions, max_new_tokens=1)
    try:
        events = list(watch.events(open_source(frames(4), fps=1.0)))
    finally:
        watch.close()
    kinds = [type(e).__name__ if not isinstance(e, Answered) else e.question.text for e in events]
    assert kinds == ["Started", "Progress", "Progress", "first?", "Progress", "which?", "Progress"]
    assert isinstance(events[0], Started) and events[0].expected_frames == 4
    answered = [e for e in events if isinstance(e, Answered)]
    assert [e.answer.frames for e in answered] == [2, 3]  # inclusive: the frame at the question's time is seen
    assert answered[0].option_logprobs is None and set(answered[1].option_logprobs) == {"A", "B"}
    assert [e.frames for e in events if isinstance(e, Progress)] == [1, 2, 3, 4]
    assert watch.status == "completed" and watch.pending == [] and watch.where() == "4 frames (3.0 s)"


def test_option_logprobs_read_the_letters_first_token_log_probabilities() -> None:
    session = StreamingSession.from_preset("tiny-llava-ov", stc=None)
    session.push(frames(2), [0.0, 1.0])
    options = ["a cup", "a phone", "a pen"]
    got = session.option_logprobs("What is he holding?", options)
    # reference: the logits of the prompt `ask` builds, normalised here, read at each letter's one token
    logits = session.next_token_logits("What is he holding?", options).double()
    reference = logits - torch.logsumexp(logits, dim=0)
    ids = {letter: session.tokenizer.convert_tokens_to_ids(letter) for letter in "ABC"}
    assert got == pytest.approx({letter: float(reference[i]) for letter, i in ids.items()}, abs=1e-5)
    assert session.option_logprobs("What is he holding?", options) == got  # the cache is left as it was
    listed = session.option_logprobs("What is he holding?\nA. a cup\nB. a phone", letters=2)
    assert set(listed) == {"A", "B"}
    session.close()


def test_an_interrupted_run_counts_its_frames_as_the_summary_does(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between the two variants' pushes of frame 3: one has 3 frames, the other 2, and the
    note says so, as the table does."""
    push = StreamingSession.push

    def interrupted(self, images, timestamps, codec=None):
        if self.stc is not None and self.stats.frames == 2:
            raise KeyboardInterrupt
        return push(self, images, timestamps, codec)

    monkeypatch.setattr(StreamingSession, "push", interrupted)
    out = tmp_path / "run.json"
    result = runner.invoke(app, ["run", "demo", "--compare", "--fps", "1", "--max-seconds", "6", "--ask", "5:late?",
                                 "--output", str(out)])
    assert result.exit_code == 130, result.output
    record = json.loads(out.read_text())
    assert {name: stats["frames"] for name, stats in record["stats"].items()} == {"no STC": 3, "STC": 2}
    assert record["notes"] == ["interrupted (Ctrl-C) after 3 frames (no STC), 2 frames (STC) (1.0 s)"]
    assert record["stream"]["frames"] == 3


def test_a_refused_run_and_an_interrupted_start_write_their_record(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "refused.json"
    result = runner.invoke(app, ["run", str(tmp_path / "nope.mp4"), "--ask", "2:what?", "--output", str(out)])
    assert result.exit_code != 0 and "no such video file" in str(result.exception)
    record = json.loads(out.read_text())
    assert record["status"] == "error" and record["exit_code"] == 2
    assert "no such video file" in record["notes"][0] and [q["seconds"] for q in record["unanswered"]] == [2.0]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the video is being opened, before any model exists

    monkeypatch.setattr("streamtc.sources.open_source", ctrl_c)
    out = tmp_path / "interrupted.json"
    result = runner.invoke(app, ["run", "demo", "--output", str(out)])
    assert result.exit_code == 130 and "before the stream started" in result.output
    record = json.loads(out.read_text())
    assert record["status"] == "interrupted" and record["exit_code"] == 130 and len(record["unanswered"]) == 2


def test_resume_records_the_saved_memory_and_refuses_settings_it_would_not_use(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    first = runner.invoke(app, ["run", "demo", "--no-stc", "--fps", "1", "--max-seconds", "2", "--ask", "1:what?",
                                "--max-new-tokens", "1", "--memory", "retrieval", "--window-tokens", "32",
                                "--retrieve-frames", "4", "--save", str(saved)])
    assert first.exit_code == 0, first.output
    out = tmp_path / "resumed.json"
    resumed = runner.invoke(app, ["run", "demo", "--fps", "1", "--max-seconds", "4", "--ask", "3:now?",
                                  "--max-new-tokens", "1", "--resume", str(saved), "--output", str(out)])
    assert resumed.exit_code == 0, resumed.output
    record = json.loads(out.read_text())
    assert record["memory"]["kind"] == "retrieval" and record["memory"]["retrieve_frames"] == 4
    assert record["memory"]["window_tokens"] == record["window_tokens"] == 32
    assert "memory [no STC]: retrieval, " in resumed.output and record["stc"] == {"no STC": None}
    refused = runner.invoke(app, ["run", "demo", "--resume", str(saved), "--retrieve-frames", "8"])
    assert refused.exit_code == 2 and "drop --retrieve-frames" in refused.output
