"""The streaming run: one video through one session, each question asked as the stream reaches it,
with its benchmark protocol's prompt and clip rule.

    for record in run_video(session, task, protocol, EvalSettings(fps=1.0)):
        writer.write(record)

Per video: `session.reset()`, then the video is decoded once, in time order, sampled at `fps`
(`streamtc.sources.PyAVSource`: the first frame at or after each instant 0, 1/fps, 2/fps, ...),
and each sampled frame is pushed once. A question at time t sees exactly the sampled frames
strictly before its protocol's cut (`Protocol.cut`: ceil(t) for OVO-Bench, int(t) for
StreamingBench, as their clips are cut): it is asked just before the first frame at or after the
cut is pushed. Questions without a time (offline benchmarks) and those whose cut lies after the
last frame are asked after the whole video. A question whose clip holds no frame (t = 0) gets an
error line, as the official harness gets no reply for an empty clip. No prefix is ever encoded
twice: a video costs one pass over its frames, not a sum over its questions' clips.

The loop is `streamtc.loop.StreamLoop` (the one `streamtc run` uses), in its exclusive mode: a
frame within its tolerance (1 microsecond) of the cut counts as at the cut, so not before it.
Frames are pushed in chunks of `session.chunk_frames` (one Cacher chunk per push); a chunk is cut
short when a question falls due. When every question is timed,
decoding stops at the last question's cut, and no frame at or after it is encoded.

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..checks import positive_int
from ..errors import ConfigError, InputError, VideoSourceError
from ..loop import StreamLoop
from ..session import StreamingSession
from ..sources import Frame, PyAVSource
from .benchmarks.base import Protocol
from .datasets import Problem, Question, VideoTask
from .results import Key
from .scoring import judge_record

logger = logging.getLogger(__name__)

STREAM_VERSION = "stream/2"  # stream/1 asked at floor(t*fps)+1 frames with one shared prompt


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
        positive_int(self.max_new_tokens, "max_new_tokens")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_NOT_ASKED = {"response": None, "prediction": None, "frames": None, "stream_time": None, "ttft_ms": None,
              "total_ms": None, "prefill_ms": None, "token_ids": None, "option_logprobs": None}


def question_record(question: Question, protocol: Protocol) -> dict[str, Any]:
    """The fields of an answer record that describe the question; `answer` is the label the
    protocol compares with."""
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
        "answer": protocol.expected(question),
        "extra": question.extra,
    }


def error_record(question: Question, protocol: Protocol, error: str, kind: str = "video") -> dict[str, Any]:
    """The answer record of a question that could not be asked; kind: "video" (the video failed),
    "empty_clip" (its clip holds no frame) or "question" (the session refused the prompt)."""
    record = {**question_record(question, protocol), **_NOT_ASKED, "error": error, "error_kind": kind}
    record["correct"] = judge_record(protocol, record)[1]
    return record


def problem_record(problem: Problem) -> dict[str, Any]:
    """The error line of an annotation record that could not be read."""
    return {"type": "answer", "video": problem.video, "qid": problem.qid, "trigger": problem.trigger,
            "task": problem.task, "category": None, "kind": None, "question_time": None, "question": None,
            "options": None, "answer": None, "extra": {}, **_NOT_ASKED, "correct": False,
            "error": f"unreadable annotation: {problem.message}", "error_kind": "annotation"}


def ask(session: StreamingSession, question: Question, protocol: Protocol, settings: EvalSettings) -> dict[str, Any]:
    """Ask one question on the stream so far with its protocol's prompt; its answer record. A
    question the session refuses (`InputError`) gets an error record instead of stopping the run."""
    prompt = protocol.prompt(question)
    try:
        answer = session.ask(prompt.text, max_new_tokens=settings.max_new_tokens, answer_prefix=prompt.answer_prefix)
    except InputError as refused:
        return error_record(question, protocol, f"question refused: {refused}", kind="question")
    logprobs = None
    if settings.option_logprobs and question.options:
        logprobs = session.option_logprobs(prompt.text, letters=len(question.options),
                                           answer_prefix=prompt.answer_prefix)
    record = {
        **question_record(question, protocol),
        "response": answer.text,
        "error": None,
        "error_kind": None,
        "frames": answer.frames,
        "stream_time": answer.timestamp,
        "ttft_ms": answer.ttft_ms,
        "total_ms": answer.total_ms,
        "prefill_ms": answer.prefill_ms,
        "token_ids": answer.token_ids,
        "option_logprobs": logprobs,
    }
    record["prediction"], record["correct"] = judge_record(protocol, record)
    return record


def run_video(
    session: StreamingSession,
    task: VideoTask,
    protocol: Protocol,
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
    timed = [q for q in questions if q.time is not None and protocol.cut is not None]
    cuts = [protocol.cut(q.time) for q in timed]
    at_end = [q for q in questions if q.time is None or protocol.cut is None]

    def push(frames: list[Frame]) -> None:
        session.push(np.stack([f.image for f in frames]), [f.timestamp for f in frames], codec=[f.codec for f in frames])

    # a question sees the frames strictly before its cut, as the benchmark cuts its clip
    loop = StreamLoop(cuts, push, chunk_frames=session.chunk_frames, inclusive=False)
    answered = 0
    error: str | None = None
    try:
        # decode no further than the last question needs
        with PyAVSource(task.path, fps=settings.fps, max_seconds=None if at_end else max(cuts)) as source:
            for index in loop.play(source, stop_when_answered=not at_end):
                question, cut = timed[index], cuts[index]
                answered += 1
                if session.frames == 0:
                    yield error_record(question, protocol, f"asked at {question.time:g} s: the clip [0, {cut:g}) "
                                       "holds no sampled frame", kind="empty_clip")
                else:
                    yield ask(session, question, protocol, settings)
        if loop.frames_read == 0:
            raise VideoSourceError(f"{task.path}: no frame was sampled")
    except VideoSourceError as failure:  # the frames decoded before it were pushed (questions due before them asked)
        error = str(failure)
        logger.info("video %s: %s", task.video, error)
    remaining = [timed[i] for i in loop.pending] + at_end
    for question in remaining:
        yield error_record(question, protocol, error) if error is not None else ask(session, question, protocol,
                                                                                      settings)
    stats = session.stats.to_dict()
    yield {
        "type": "video",
        "video": task.video,
        "questions": answered + len(remaining),
        "error": error,
        "stream_time": loop.last_time,
        **{k: stats[k] for k in ("frames", "visual_tokens", "visual_tokens_encoded", "vit_ms", "prune_ms",
                                 "prefill_ms", "peak_memory_bytes", "memory_kind")},
        "wall_s": time.perf_counter() - started,
    }


__all__ = ["EvalSettings", "STREAM_VERSION", "ask", "error_record", "problem_record", "question_record", "run_video"]
