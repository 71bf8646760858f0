"""Saved streams of `streamtc serve --persist-dir DIR`: what a graceful shutdown (or SIGTERM) and
the periodic checkpoints write, and what the next start with the same DIR restores.

    DIR/<stream id>/stream.json    the stream's settings (source, fps, resolved STC settings, memory,
                                   pacing, name), its creation time, its state, and what the save
                                   is: "shutdown" or "checkpoint", when, its frames and last
                                   timestamp, and when a restart resumed it (if one did)
    DIR/<stream id>/session/       its session's save (`StreamingSession.save`: KV cache, STC state,
                                   positions, counters; atomic and verified)

A deleted stream's folder is removed. The session's save is committed before stream.json is
replaced (atomically), and stream.json changes only in its state and its save fields, so a crash
between the two leaves a consistent pair: the settings of the save, the session one save newer at
most (what is restored is always the session's own save; its frames and timestamp are logged).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import SnapshotError
from ..memory.persist import read_json, write_json, writing_snapshot
from ..session import StreamingSession
from ..session_persist import write_session

logger = logging.getLogger(__name__)

RECORD = "stream.json"
SESSION = "session"


def _clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def restored_note(record: dict[str, Any], session: StreamingSession) -> tuple[int, str, dict[str, Any]]:
    """(log level, log line, API summary) of a stream restored from `record`'s save into `session`:
    what was restored (frames, last timestamp, when saved) and what may be lost since.

    A shutdown save never resumed before is current: nothing was lost. A checkpoint means the server
    stopped without its shutdown save (a crash, `kill -9`): what the stream did after the checkpoint
    is lost. A save that a restart already resumed is restored again only after the server stopped
    without a newer save: what the stream did since that restart is lost."""
    saved_at, resumed_at = record.get("saved_at"), record.get("resumed_at")
    summary = {"saved": record.get("saved", "shutdown"), "saved_at": saved_at, "resumed_before": resumed_at,
               "frames": session.frames, "last_timestamp": session.last_timestamp}
    what = (f"stream {record['id']}: restored {session.frames} frames up to stream time "
            f"{session.last_timestamp if session.last_timestamp is not None else '-'} s from its "
            f"{summary['saved']} save" + (f" of {_clock(saved_at)}" if saved_at else ""))
    if resumed_at is not None:
        return logging.WARNING, (f"{what}, which a restart already resumed at {_clock(resumed_at)}: the server "
                                 "then stopped without a newer save, so what the stream did after that restart "
                                 "(frames, answers) is lost; push clients resend from the restored time"), summary
    if summary["saved"] == "checkpoint":
        return logging.WARNING, (f"{what}: the server stopped without saving (crash or kill), so what the stream "
                                 "did after this checkpoint (at most the checkpoint interval: frames, answers) is "
                                 "lost; push clients resend from the restored time"), summary
    return logging.INFO, f"{what}: nothing lost", summary


class PendingSave:
    """A stream's save whose files are written but not yet committed (`StreamStore.begin`)."""

    def __init__(self, folder: Path, record: dict[str, Any], snapshot: AbstractContextManager) -> None:
        self.folder, self.record, self._snapshot = folder, record, snapshot

    def commit(self) -> None:
        """Commit the session's save (manifest, fsync, CURRENT), then the record; on an error the
        staging directory is removed and the previous save stays."""
        self._snapshot.__exit__(None, None, None)
        StreamStore.write_record(self.folder, self.record)


class SaveWriter:
    """One background thread that runs a server's disk work in order: commits of pending saves and
    removals of deleted streams' saves (a removal queued after a commit runs after it)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="streamtc-saves", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def close(self) -> None:
        """Run the queued jobs, then stop."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # each job reports its own errors; this keeps the writer alive regardless
                logger.exception("background save failed")


class StreamStore:
    """The streams saved under one directory (one folder per stream id)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _folder(self, stream_id: str) -> Path:
        if not stream_id or "/" in stream_id or stream_id.startswith("."):
            raise SnapshotError(f"{stream_id!r} is not a stream id")
        return self.directory / stream_id

    def save(self, record: dict[str, Any], session: StreamingSession) -> None:
        """Save one stream: its session's memory, then its record (with the save's time, frames and
        last timestamp)."""
        self.begin(record, session).commit()

    def begin(self, record: dict[str, Any], session: StreamingSession) -> PendingSave:
        """Write a stream's save without committing it: the session's files go into a staging
        directory (memory copies into the page cache, hard links); `commit()` on the returned
        save, from any thread, hashes, fsyncs and commits them, then writes the record. The
        session may go on changing in between."""
        folder = self._folder(record["id"])
        folder.mkdir(exist_ok=True)
        record = {**record, "saved_at": time.time(), "frames": session.frames,
                  "last_timestamp": session.last_timestamp}
        snapshot = writing_snapshot(folder / SESSION)
        staging = snapshot.__enter__()
        try:
            write_session(session, staging)
        except BaseException as error:
            snapshot.__exit__(type(error), error, error.__traceback__)  # removes the staging directory
            raise
        return PendingSave(folder, record, snapshot)

    def mark_resumed(self, record: dict[str, Any]) -> None:
        """Record that a restart resumed this save, so that restoring it again (after a crash with no
        newer save) says that what happened since is lost, instead of passing it off as current."""
        self.write_record(self._folder(record["id"]), {**record, "resumed_at": time.time()})

    @staticmethod
    def write_record(folder: Path, record: dict[str, Any]) -> None:
        """Replace a stream's record atomically."""
        temporary = folder / f".{RECORD}.tmp"
        write_json(temporary, record)
        os.replace(temporary, folder / RECORD)

    def forget(self, stream_id: str) -> None:
        """Remove a stream's save (a deleted stream must not come back)."""
        shutil.rmtree(self._folder(stream_id), ignore_errors=True)

    def saved(self) -> list[tuple[dict[str, Any], Path]]:
        """(record, session save directory) of every saved stream, oldest first; a folder without a
        record is skipped with a warning (the session save itself is verified when it loads)."""
        found = []
        for folder in sorted(p for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                record = read_json(folder / RECORD)
            except SnapshotError as error:
                logger.warning("skipping saved stream %s: %s", folder.name, error)
                continue
            found.append((record, folder / SESSION))
        return sorted(found, key=lambda item: item[0].get("created", 0.0))


__all__ = ["PendingSave", "SaveWriter", "StreamStore", "restored_note"]
