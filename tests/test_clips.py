"""OpenCV's sample clips fetched from Debian's archive: the real fetch (skipped when the archive cannot be
reached), and the extraction and verification on a package built here."""

from __future__ import annotations

import gzip
import hashlib
import math
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from streamtc import clips
from streamtc.clips import OPENCV_CLIPS, OpenCVClip, opencv_clip_path
from streamtc.errors import ConfigError, VideoSourceError
from streamtc.sources import PyAVSource

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")


@pytest.fixture(scope="module")
def fetched() -> dict[str, Path]:
    """Every clip from the real package, in the user cache; skipped when apt-get cannot download it."""
    try:
        return {name: opencv_clip_path(name) for name in OPENCV_CLIPS}
    except VideoSourceError as error:
        if "could not download" not in str(error):
            raise  # a package that downloads but fails verification is a failure, not a skip
        pytest.skip(f"Debian's archive is unreachable: {error}")


@pytest.mark.parametrize(
    "name, size, rate, seconds",
    [("vtest", (768, 576), 10.0, 79.5), ("box", (640, 480), 30.0, 15.2), ("cup", (640, 480), 26.8, 8.1)],
)
def test_fetched_clips_are_fixed_camera_footage_with_codec_side_data(
    fetched: dict[str, Path], name: str, size: tuple[int, int], rate: float, seconds: float
) -> None:
    path = fetched[name]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == OPENCV_CLIPS[name].sha256
    source = PyAVSource(path, fps=1.0)
    assert (source.width, source.height) == size and source.side_data
    assert source.native_fps == pytest.approx(rate, abs=0.1) and source.duration == pytest.approx(seconds, abs=0.1)
    frames = list(source)
    assert len(frames) == int(seconds) + 1 and all(f.codec is not None for f in frames)
    # A fixed camera: most of the picture (wall, table, lawn) looks as in the first frame, sampled frame
    # after frame (medians of 3, 7 and 8 grey levels; the street clip's moving camera gives over 30).
    first = frames[0].image.astype(np.float32)
    assert np.median([np.median(np.abs(f.image - first)) for f in frames[1:]]) < 10


def test_fetched_film_clip_has_cuts_and_the_tree_clip_has_no_motion_vectors(fetched: dict[str, Path]) -> None:
    """megamind: MPEG-4 Part 2 with vectors, a dialogue scene opening from black and cut between two
    characters; its shots change at decoded frames 1, 98, 154 and 200 (from the pixels below), which
    at 1 fps of 23.976 fps video fall into the intervals of sampled frames 1, 5, 7 and 9. tree:
    Cinepak, which exports no vectors, so its frames carry no codec data and the Cacher runs on pixels."""
    with av.open(str(fetched["megamind"])) as container:
        grey = [f.to_ndarray(format="gray").astype(np.float32) for f in container.decode(video=0)]
    jumps = [i for i in range(1, len(grey)) if np.abs(grey[i] - grey[i - 1]).mean() > 30]
    assert jumps == [1, 98, 154, 200]
    film = PyAVSource(fetched["megamind"], fps=1.0)
    assert (film.width, film.height) == (720, 528) and film.side_data
    assert [i for i, f in enumerate(film) if f.codec.cut] == sorted({math.ceil(j / 23.976) for j in jumps})
    tree = PyAVSource(fetched["tree"], fps=1.0)
    assert (tree.width, tree.height) == (320, 240) and not tree.side_data
    assert all(f.codec is None for f in tree)


def test_unknown_clip_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="vtest"):
        opencv_clip_path("parking-lot")


def test_a_corrupt_cached_clip_is_fetched_again_and_a_failed_fetch_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = tmp_path / clips.CLIPS_DIR / "vtest.avi"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the clip")
    monkeypatch.setattr(clips.shutil, "which", lambda name: None)  # a machine without apt-get
    with pytest.raises(VideoSourceError, match="could not download opencv-doc.*apt-get"):
        opencv_clip_path("vtest", root=tmp_path)


def build_package(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A .deb holding `files` (member path -> content), built with dpkg-deb."""
    root = tmp_path / "package"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: opencv-doc\nVersion: 1.0\nArchitecture: all\nMaintainer: test <test@example.org>\nDescription: test\n"
    )
    for member, content in files.items():
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(content)
    deb = tmp_path / "opencv-doc_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    return deb


@needs_dpkg
def test_clips_are_read_out_of_the_package_unzipped_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    video, other = b"a plain clip" * 1000, b"a gzipped clip" * 1000
    monkeypatch.setattr(clips, "OPENCV_CLIPS", {
        "plain": OpenCVClip("./usr/share/doc/x/plain.avi", hashlib.sha256(video).hexdigest(), "plain"),
        "zipped": OpenCVClip("./usr/share/doc/x/zipped.mp4.gz", hashlib.sha256(other).hexdigest(), "zipped", True),
    })
    deb = build_package(tmp_path, {"usr/share/doc/x/plain.avi": video, "usr/share/doc/x/zipped.mp4.gz": gzip.compress(other),
                                   "usr/share/doc/x/unrelated.txt": b"skip me"})
    target = tmp_path / "cache"
    target.mkdir()
    clips._extract_clips(deb, target)
    assert (target / "plain.avi").read_bytes() == video and (target / "zipped.mp4").read_bytes() == other
    assert sorted(p.name for p in target.iterdir()) == ["plain.avi", "zipped.mp4"]


@needs_dpkg
def test_a_clip_with_the_wrong_hash_or_a_missing_clip_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clips, "OPENCV_CLIPS", {
        "plain": OpenCVClip("./usr/share/doc/x/plain.avi", hashlib.sha256(b"expected").hexdigest(), "plain"),
    })
    target = tmp_path / "cache"
    target.mkdir()
    with pytest.raises(VideoSourceError, match="expected SHA-256"):
        clips._extract_clips(build_package(tmp_path / "bad", {"usr/share/doc/x/plain.avi": b"altered"}), target)
    assert list(target.iterdir()) == []
    with pytest.raises(VideoSourceError, match="lacks"):
        clips._extract_clips(build_package(tmp_path / "empty", {"usr/share/doc/x/other.avi": b"expected"}), target)
