"""Results files: one JSON line per answered question, written as it is answered, resumable.

Layout (`RUN.jsonl`):

    {"type": "header", "format": "streamtc-eval/1", "config": {...}, "model_id": ..., "environment": {...}, ...}
    {"type": "answer", "video": ..., "qid": ..., "trigger": ..., "response": ..., "prediction": ..., ...}
    {"type": "video", "video": ..., "frames": ..., "vit_ms": ..., "prefill_ms": ..., ...}
    ...
    {"type": "plan", "questions": 2500}          (only when a resumed run plans a different total)
    {"type": "summary", "score": {...}, "timing": {...}, "complete": true}

- The header is the first line. Its `config` is the run's identity (benchmark and annotation
  hash, model, STC config, fps, generation settings, protocol and its version): a run refuses to append to
  a file whose header `config` differs (`ResultsMismatchError`, naming the differing keys).
  The run's environment (`measure.environment`: versions, machine, threads, git revision, date) is
  recorded too; a version change is only warned about on resume. The
  header's `questions` is how many questions the run plans to answer (a `plan` line updates it
  when a resumed run plans another number, e.g. with another --max-videos), so a report can tell
  a finished run from an interrupted one.
- An answer line is appended, flushed and fsync'ed as soon as the question is answered. A video
  line follows the last answer of a video (its streaming cost); a summary line ends each run
  that finished (informative only: `streamtc eval report` recomputes everything from the answers).
- Resume: the key (video, qid, trigger) of every answer line is done and never asked again.
  Answers recorded with an `error` (video missing or unreadable) are done too, unless the run is
  told to retry them; the retried answer is appended and, on reading, the last line of a key wins.
- A crash can leave a partial last line: readers skip it (with a warning) and the writer cuts it
  off before appending, so the file never holds a broken line in the middle. Any other broken
  line is corruption and raises.
- One writer at a time: the file is locked (advisory `flock`) while a run appends.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ..errors import ConfigError, StreamStateError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locking
    fcntl = None

logger = logging.getLogger(__name__)

FORMAT = "streamtc-eval/1"

Key = tuple[str, str, int | None]


class ResultsMismatchError(ConfigError):
    """An existing results file was written with a different configuration."""


def record_key(record: dict[str, Any]) -> Key:
    """(video, qid, trigger) of an answer record."""
    return (record["video"], str(record["qid"]), record.get("trigger"))


@dataclass
class RunResults:
    """A results file as read: header, the answer of each key (last line wins), video cost lines,
    summary lines, and bookkeeping of what reading skipped."""

    path: Path
    header: dict[str, Any]
    answers: dict[Key, dict[str, Any]] = field(default_factory=dict)
    videos: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    planned: int | None = None
    superseded: int = 0
    truncated_tail: bool = False

    @property
    def config(self) -> dict[str, Any]:
        return self.header["config"]

    @property
    def benchmark(self) -> str:
        return self.config["benchmark"]

    @property
    def protocol(self) -> str:
        """"official" or "paper"; a file written before protocols existed is refused."""
        protocol = self.config.get("protocol")
        if protocol not in ("official", "paper"):
            raise ConfigError(f"{self.path} was written by an older streamtc (protocol {protocol!r}); its answers "
                              "used one shared prompt and frame rule: run the benchmark again")
        return protocol

    @property
    def complete(self) -> bool:
        """Whether every planned question has an answer line."""
        return self.planned is not None and len(self.answers) >= self.planned

    def done_keys(self, *, retry_errors: bool = False) -> set[Key]:
        """Keys that need no new answer."""
        return {k for k, r in self.answers.items() if not (retry_errors and r.get("error") is not None)}


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, is_last) of a file's lines."""
    with path.open("r", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # text after the last "\n" is an unterminated tail (empty when the file ends with "\n")
    complete, tail = lines[:-1], lines[-1]
    for number, line in enumerate(complete, start=1):
        yield number, line, (number == len(complete) and not tail)
    if tail:
        yield len(complete) + 1, tail, True


def read_results(path: str | Path) -> RunResults:
    """Read a results file (see the module docstring for what is tolerated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such results file")
    results: RunResults | None = None
    for number, line, is_last in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if is_last:
                logger.warning("%s: ignoring a partial last line (an interrupted write)", path)
                if results is not None:
                    results.truncated_tail = True
                continue
            raise StreamStateError(f"{path}: line {number} is not JSON; the file is corrupt") from None
        if results is None:
            if record.get("type") != "header" or record.get("format") != FORMAT:
                raise ConfigError(f"{path}: not a streamtc results file (first line is not a {FORMAT} header)")
            results = RunResults(path, record, planned=record.get("questions"))
            continue
        kind = record.get("type")
        if kind == "answer":
            key = record_key(record)
            results.superseded += key in results.answers
            results.answers[key] = record
        elif kind == "video":
            results.videos.append(record)
        elif kind == "summary":
            results.summaries.append(record)
        elif kind == "plan":
            results.planned = record.get("questions")
        else:
            raise StreamStateError(f"{path}: line {number} has unknown type {kind!r}")
    if results is None:
        raise ConfigError(f"{path}: empty results file")
    return results


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def header_versions(header: dict[str, Any]) -> dict[str, Any]:
    """The package versions a results header records (in its environment, or, in files written
    before the environment record, under "versions")."""
    return (header.get("environment") or {}).get("versions") or header.get("versions", {})


class ResultsWriter:
    """Appends records to a results file, one fsync'ed line each.

    Opening an existing file checks its header against `header` (same `config`, else
    `ResultsMismatchError`; `upgrade` first brings the file's config to the current form, e.g.
    settings added since it was written, at the defaults it ran with), cuts off a partial last line,
    and exposes what was already there as `existing` (None for a new file).
    """

    def __init__(self, path: str | Path, header: dict[str, Any],
                 upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        if header.get("type") != "header" or "config" not in header:
            raise ConfigError("a results header needs type 'header' and a 'config'")
        self.existing: RunResults | None = None
        self._handle = None
        if self.path.exists() and self.path.stat().st_size > 0:
            self.existing = read_results(self.path)
            written = self.existing.config if upgrade is None else upgrade(self.existing.config)
            differences = config_differences(written, header["config"])
            if differences:
                raise ResultsMismatchError(
                    f"{self.path} was written with a different configuration ({', '.join(differences)}); "
                    "resume it with the same settings, or write to a new --output file"
                )
            before = header_versions(self.existing.header)
            for name, value in header_versions(header).items():
                if before.get(name) != value:
                    logger.warning("%s: %s was %s when this file was started, now %s", self.path, name,
                                   before.get(name), value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._handle.close()
                raise StreamStateError(f"{self.path} is being written by another run") from None
        if self.existing is None:
            self._handle.truncate(0)
            self.write(header)
        else:
            self._cut_partial_tail()

    def _cut_partial_tail(self) -> None:
        """Truncate the file after its last newline (drops a line a crash left unfinished)."""
        with self.path.open("rb") as handle:
            data = handle.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self._handle.truncate(end)
            logger.warning("%s: removed a partial last line left by an interrupted run", self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a line, flushed to disk before returning."""
        if self._handle is None:
            raise StreamStateError(f"{self.path}: writer is closed")
        self._handle.seek(0, os.SEEK_END)
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # also releases the lock
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


__all__ = [
    "FORMAT",
    "Key",
    "ResultsMismatchError",
    "ResultsWriter",
    "RunResults",
    "config_differences",
    "header_versions",
    "read_results",
    "record_key",
]
