"""Saved streams of `streamtc serve --persist-dir DIR`: what a graceful shutdown (or SIGTERM) writes
and the next start with the same DIR resumes.

    DIR/<stream id>/stream.json    the stream's settings (source, fps, resolved STC settings, memory,
                                   pacing, name), its creation time and its state at shutdown
    DIR/<stream id>/session/       its session's save (`StreamingSession.save`: KV cache, STC state,
                                   positions, counters; atomic and verified)

A deleted stream's folder is removed. The session's save is committed before stream.json is
replaced (atomically), and stream.json never changes after the first save but for the state, so
a crash between the two leaves a consistent pair.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import SnapshotError
from ..memory.persist import read_json, write_json
from ..session import StreamingSession

logger = logging.getLogger(__name__)

RECORD = "stream.json"
SESSION = "session"


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
        """Save one stream: its session's memory, then its record."""
        folder = self._folder(record["id"])
        folder.mkdir(exist_ok=True)
        session.save(folder / SESSION)
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


__all__ = ["StreamStore"]
