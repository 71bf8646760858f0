"""The streaming protocol: one video through one session, questions asked as the stream reaches them.

    for record in run_video(session, task, EvalSettings(fps=1.0)):
        writer.write(record)

Per video: `session.reset()`, then the video is decoded once, in time order, sampled at `fps`
(`streamtc.sources.PyAVSource`: the first frame at or after each instant 0, 1/fps, 2/fps, ...),
and each sampled frame is pushed once. A question with time t is asked as soon as every sampled
frame with timestamp <= t has been pushed, i.e. just before the first frame later than t, so it
sees floor(t * fps) + 1 frames (when the video lasts that long); forward-active items are asked at
each trigger point the same way. Questions without a time (offline benchmarks), and those timed
after the last frame, are asked after the whole video. No prefix is ever encoded twice: the cost
of a video is one pass over its frames, not a sum over its questions' prefixes (the published
OVO-Bench and StreamingBench harnesses cut and re-encoded the clip [0, t] for every question).

Frames are pushed in chunks of `session.chunk_frames` (one Cacher chunk per push, as in
`streamtc run`); a chunk is cut short when a question falls due. When every question is timed,
decoding stops after the last question's time.

A video that is missing, not a video, undecodable or truncated (`VideoSourceError`) does not stop
the run: the questions whose frames were all decoded before the failure are still answered, and
every other question of the video gets an answer record with `error` set (scored wrong, and listed
in the report). Any other exception propagates: the results written so far stay, and the run
resumes from them.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, VideoSourceError
from ..prompts import OPTION_LETTERS
from ..session import StreamingSession
from ..sources import Frame, PyAVSource
from .datasets import Question, VideoTask
from .results import Key
from .scoring import is_correct, parse_prediction

logger = logging.getLogger(__name__)

PROTOCOL = "stream/1"
_EPS = 1e-6  # seconds; a question at t is due before a frame at t + _EPS or later


@dataclass(frozen=True)
class EvalSettings:
    """How questions are asked.

    fps: frames sampled per second of video. max_new_tokens: answer length limit (greedy).
    option_logprobs: also record, for multiple-choice questions, the log-probability of each option
        letter as the first answer token (one extra question pre-fill, no decoding); useful to
        compare runs (e.g. STC against uncompressed) beyond the argmax, and to check runs match.
    """

    fps: float = 1.0
    max_new_tokens: int = 16
    option_logprobs: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise ConfigError(f"fps must be a finite number > 0, got {self.fps!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _letter_token_ids(tokenizer: Any, count: int) -> dict[str, int]:
    """Single-token ids of the letters A.. (letters that are not one token are left out)."""
    ids = {}
    for letter in OPTION_LETTERS[:count]:
        encoded = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids[letter] = encoded[0]
    return ids


def _question_record(question: Question) -> dict[str, Any]:
    """The fields of an answer record that describe the question."""
    return {
        "type": "answer",
        "video": question.video,
        "qid": question.qid,
        "trigger": question.trigger,
        "task": question.task,
        "category": question.category,
        "kind": question.kind,
        "question_time": question.time,
        "question": question.text,
        "options": list(question.options) if question.options else None,
        "answer": question.answer,
        "extra": question.extra,
    }


def error_record(question: Question, error: str) -> dict[str, Any]:
    """The answer record of a question that could not be asked (its video failed)."""
    return {**_question_record(question), "response": None, "prediction": None, "correct": is_correct(
        {"answer": question.answer, "error": error}), "error": error, "frames": None, "stream_time": None,
        "ttft_ms": None, "total_ms": None, "prefill_ms": None, "token_ids": None, "option_logprobs": None}


def ask(session: StreamingSession, question: Question, settings: EvalSettings) -> dict[str, Any]:
    """Ask one question on the stream so far; its answer record."""
    answer = session.ask(question.text, options=question.options, max_new_tokens=settings.max_new_tokens)
    logprobs = None
    if settings.option_logprobs and question.options:
        logits = session.next_token_logits(question.text, question.options)
        log_softmax = torch.log_softmax(logits, dim=-1)
        logprobs = {letter: float(log_softmax[i])
                    for letter, i in _letter_token_ids(session.tokenizer, len(question.options)).items()}
    record = {
        **_question_record(question),
        "response": answer.text,
        "prediction": parse_prediction(question.kind, answer.text, question.options),
        "error": None,
        "frames": answer.frames,
        "stream_time": answer.timestamp,
        "ttft_ms": answer.ttft_ms,
        "total_ms": answer.total_ms,
        "prefill_ms": answer.prefill_ms,
        "token_ids": answer.token_ids,
        "option_logprobs": logprobs,
    }
    record["correct"] = is_correct(record)
    return record


def run_video(
    session: StreamingSession,
    task: VideoTask,
    settings: EvalSettings,
    pending: set[Key] | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream `task`'s video through `session` and yield an answer record per question (only
    those in `pending`, when given) as each is answered, then one video record (its cost).

    The session is reset first; see the module docstring for the protocol.
    """
    questions = [q for q in task.questions if pending is None or q.key in pending]
    if not questions:
        return
    started = time.perf_counter()
    session.reset()
    due = deque(q for q in questions if q.time is not None)  # in time order (VideoTask sorts)
    at_end = [q for q in questions if q.time is None]
    answered = 0
    buffer: list[Frame] = []
    last_time: float | None = None  # timestamp of the last frame pushed
    error: str | None = None

    def flush() -> None:
        nonlocal last_time
        if buffer:
            session.push(np.stack([f.image for f in buffer]), [f.timestamp for f in buffer])
            last_time = buffer[-1].timestamp
            buffer.clear()

    try:
        # decode no further than the last question needs
        with PyAVSource(task.path, fps=settings.fps, max_seconds=None if at_end else due[-1].time) as source:
            for frame in source:
                if due and due[0].time < frame.timestamp - _EPS and (buffer or session.frames):
                    flush()
                    while due and due[0].time < frame.timestamp - _EPS:
                        yield ask(session, due.popleft(), settings)
                        answered += 1
                buffer.append(frame)
                if len(buffer) == session.chunk_frames:
                    flush()
        flush()
        if session.frames == 0:
            raise VideoSourceError(f"{task.path}: no frame was sampled")
    except VideoSourceError as failure:
        error = str(failure)
        logger.info("video %s: %s", task.video, error)
        flush()  # frames decoded before the failure are sound
        # questions whose every frame was decoded are still answered
        while due and last_time is not None and due[0].time <= last_time + _EPS:
            yield ask(session, due.popleft(), settings)
            answered += 1
    remaining = list(due) + at_end
    for question in remaining:
        yield error_record(question, error) if error is not None else ask(session, question, settings)
    stats = session.stats.to_dict()
    yield {
        "type": "video",
        "video": task.video,
        "questions": answered + len(remaining),
        "error": error,
        "stream_time": last_time,
        **{k: stats[k] for k in ("frames", "visual_tokens", "visual_tokens_encoded", "vit_ms", "prune_ms",
                                 "prefill_ms", "peak_memory_bytes", "memory_kind")},
        "wall_s": time.perf_counter() - started,
    }


__all__ = ["EvalSettings", "PROTOCOL", "ask", "error_record", "run_video"]
