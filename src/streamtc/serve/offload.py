"""The server's own folder under `--offload-dir`, and the removal of those a killed server left.

Retrieval streams offload their oldest KV blocks to a private folder each (`DiskStore`), which a
stream's close removes. A server killed with `kill -9` closes nothing, so its streams' folders
stay. Each server therefore puts its streams' folders inside one folder of its own,
`OFFLOAD_DIR/serve-<random>/`, marked by a `.streamtc-serve` file that it holds locked (`flock`)
while it runs. At start, a server removes every marked folder whose lock is free: its server is
gone (the kernel drops a dead process's locks), and no save refers to it (a save hard-links or
copies the segments it needs into itself). Folders without the marker are never touched.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = ".streamtc-serve"


def _lock(marker: Path, flags: int = os.O_RDWR) -> int | None:
    """An open descriptor of `marker` holding its exclusive lock, or None when another process holds it."""
    descriptor = os.open(marker, flags)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def remove_abandoned(offload_dir: Path) -> list[Path]:
    """Remove the marked server folders under `offload_dir` whose server is gone; returns them."""
    removed = []
    for marker in sorted(offload_dir.glob(f"serve-*/{MARKER}")):
        try:
            descriptor = _lock(marker)
        except OSError:
            continue
        if descriptor is None:  # a running server's
            continue
        try:
            shutil.rmtree(marker.parent)
            removed.append(marker.parent)
        finally:
            os.close(descriptor)
    for folder in removed:
        logger.info("removed %s: offloaded blocks of a server that stopped without closing its streams", folder)
    return removed


class OwnedOffloadDir:
    """This server's folder under `offload_dir` (made and locked now; `release()` removes it)."""

    def __init__(self, offload_dir: Path | str) -> None:
        root = Path(offload_dir)
        root.mkdir(parents=True, exist_ok=True)
        remove_abandoned(root)
        self.path = Path(tempfile.mkdtemp(prefix="serve-", dir=root))
        self._descriptor = _lock(self.path / MARKER, os.O_RDWR | os.O_CREAT)  # locked before anyone can see it
        os.write(self._descriptor, json.dumps({"pid": os.getpid(), "started": time.time(), "note": "streamtc "
                                               "serve's offloaded blocks; removed once this server is gone"}).encode())

    def release(self) -> None:
        """Remove the folder (its streams are closed) and drop the lock. Idempotent."""
        if self._descriptor is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._descriptor)
        self._descriptor = None


__all__ = ["MARKER", "OwnedOffloadDir", "remove_abandoned"]
