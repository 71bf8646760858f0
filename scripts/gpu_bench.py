"""Short GPU benchmarks for scripts/gpu-check.sh: one part per call, a JSON file per part.

    python scripts/gpu_bench.py vit --dtype bfloat16 --out DIR      # ViT: eager, compiled, CUDA graphs
    python scripts/gpu_bench.py prefill --out DIR                   # the streaming pipeline's pre-fill
    python scripts/gpu_bench.py table DIR                           # print every part's rows as one table
    python scripts/gpu_bench.py vit --dry-run --out DIR             # the same on the CPU, tiny, to check the plumbing

`vit`: the SigLIP-so400m tower of LLaVA-OneVision at full depth (26 layers, 729 tokens), 16 frames
of the street clip, one frame per chunk, through the unpatched tower and STC-Cacher (N = 2,
r = 0.25) eager, compiled (`compile_mode="default"`) and with CUDA graphs (`"reduce-overhead"`);
each variant's time is the median of its per-frame ratios to the unpatched frame encoded beside it.
The compiled rows run as a second pass, so a compiler failure still leaves the eager rows. `prefill`:
`bench pipeline` on LLaVA-OV-0.5B (random weights) at 16 and 32 frames, no compression vs STC vs
the Pruner alone. Every JSON file carries the run's environment record (`streamtc.measure`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from streamtc.bench.pipeline import PipelineSettings, load_video_frames, run_pipeline_benchmark
from streamtc.variants import VARIANTS
from streamtc.bench.vit import Variant, load_benchmark_frames, run_vit_benchmark
from streamtc.config import CacherConfig
from streamtc.measure import environment
from streamtc.presets import DTYPE_NAMES, build_model, torch_dtype

STC = {"cache_interval": 2, "update_ratio": 0.25}
EAGER = (Variant("full", None), Variant("full (control)", None), Variant("stc N=2 eager", CacherConfig(**STC)))
COMPILED = (
    Variant("full", None),
    Variant("stc N=2 compiled", CacherConfig(**STC, compile_mode="default")),
    Variant("stc N=2 cuda graphs", CacherConfig(**STC, compile_mode="reduce-overhead")),
)


def vit(args: argparse.Namespace) -> dict[str, Any]:
    dtype = torch_dtype(args.dtype)
    preset, layers, frames = ("tiny-siglip", None, 4) if args.dry_run else ("siglip-so400m-384", None, args.frames)
    pixels = load_benchmark_frames("demo", frames, 56 if args.dry_run else 384)
    tower = build_model(preset, num_layers=layers, dtype=dtype)
    passes: list[dict[str, Any]] = []
    for name, variants in (("eager", EAGER), ("compiled", COMPILED)):
        if args.dry_run and name == "compiled":
            passes.append({"pass": name, "skipped": "dry run: no compiler or CUDA graphs on the CPU"})
            continue
        start = time.perf_counter()
        try:
            report = run_vit_benchmark(pixels, preset, None, variants, repeats=args.repeats, warmup=1,
                                       device=args.device, dtype=dtype, model=tower)
        except Exception as error:  # recorded in the JSON and the table; the other pass still counts
            passes.append({"pass": name, "error": f"{type(error).__name__}: {error}",
                           "traceback": traceback.format_exc(limit=6)})
            continue
        rows = [{"variant": v["name"], "ms_per_frame": v["total_ms"] / len(v["per_frame_ms"]),
                 "time_ratio": v["time_ratio"], "flop_ratio": v["flop_ratio"],
                 "token_cosine_mean": v["token_cosine_mean"]} for v in report["variants"]]
        passes.append({"pass": name, "seconds": time.perf_counter() - start, "rows": rows, "report": report})
    return {"part": f"vit {args.dtype}", "preset": preset, "frames": frames, "passes": passes,
            "environment": environment(args.device, vars(args))}


def prefill(args: argparse.Namespace) -> dict[str, Any]:
    frames = (2, 4) if args.dry_run else (16, 32)
    settings = PipelineSettings(preset="tiny-llava-ov" if args.dry_run else "llava-ov-0.5b", frames=frames,
                                repeats=args.repeats, warmup_frames=2, max_new_tokens=2, device=args.device,
                                dtype=args.dtype)
    variants = [VARIANTS[n] for n in ("none", "stc", "pruner gaussian 30%")]
    report = run_pipeline_benchmark(settings, variants, frames=load_video_frames("demo", max(frames)))
    rows = [{"variant": f"{r['variant']} @{r['frames']}", "prefill_ms": r["prefill_ms"],
             "prefill_ratio": r["prefill_ratio"], "vit_ms_per_frame": r["vit_ms_per_frame"],
             "e2e_speedup": r["e2e_speedup"]} for r in report["rows"]]
    return {"part": f"prefill {args.dtype}", "passes": [{"pass": "pipeline", "rows": rows, "report": report}],
            "environment": environment(args.device, vars(args))}


def table(directory: Path) -> str:
    """Every part's rows, one line each; errors and skips as lines of their own."""
    lines = [f"{'part':<18} {'pass':<9} {'variant':<26} {'ms':>9} {'ratio':>7} {'flops':>6} {'cosine':>7}"]
    for path in sorted(directory.glob("bench-*.json")):
        part = json.loads(path.read_text())
        for p in part["passes"]:
            if "rows" not in p:
                lines.append(f"{part['part']:<18} {p['pass']:<9} {p.get('error') or p.get('skipped')}")
                continue
            for r in p["rows"]:
                ms = r.get("ms_per_frame", r.get("prefill_ms"))
                ratio = r.get("time_ratio", r.get("prefill_ratio"))
                flops, cosine = r.get("flop_ratio"), r.get("token_cosine_mean")
                lines.append(f"{part['part']:<18} {p['pass']:<9} {r['variant']:<26} {ms:>9.2f} {ratio:>7.3f} "
                             f"{'' if flops is None else f'{flops:.3f}':>6} {'' if cosine is None else f'{cosine:.4f}':>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("vit", "prefill", "table"))
    parser.add_argument("directory", nargs="?", type=Path, help="for 'table': the output directory")
    parser.add_argument("--out", type=Path, help="directory for bench-<part>-<dtype>.json")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the plumbing only")
    args = parser.parse_args(argv)
    if args.part == "table":
        print(table(args.directory or args.out))
        return 0
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available to this Python (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    result = vit(args) if args.part == "vit" else prefill(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{args.part}-{args.dtype}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return 1 if any("error" in p for p in result["passes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
