"""The best any refresh policy could do with the budget Cacher's actions: a clairvoyant bound per stream.

    streamtc bench bound --streams demo@1,carphone@2,cup@2 --budgets 0.479,0.653
    streamtc bench bound --against real.json --output bound.json    # + bound.curves.png (`plot_curves`)

The robust profile picks each frame's action from what it knows before encoding the frame (codec
hints, pixel change). When it loses, is it the actions or the signals? This measures, on real
weights, the fidelity of every action on every frame of a stream, then finds by dynamic programming
the schedule with the best mean patch-token cosine under a FLOP budget, knowing every outcome in
advance, and separately the best worst frame. No policy with these actions can beat either number;
the gap between them and the robust profile is what its signals fail to predict.

Actions per frame (cost as a share of a full frame, by the Cacher's own FLOP count):
- refresh: the full forward (cosine 1, cost 1); the frame becomes the reference;
- reuse: the Cacher's non-refresh chunk against a reference up to MAX_GAP frames back, at each of
  REUSE_RATIOS;
- skip: the reference's output handed out as it is (cost 0; what frame skipping does);
- downscale: the whole frame on every smaller square grid down to MIN_SIDE_SHARE of the side
  (`UniformDownscaling`; the Cacher's over-budget encode).
The budget holds over the whole stream (a causal policy must also hold it on every prefix, so this
bound is loose by that much too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..baselines.vit import UniformDownscaling
from ..cacher import STCCacher
from ..cacher.downscale import MIN_SIDE_SHARE, downscale_cost
from ..cacher.towers import encoder_layers, mlp_width, prefix_tokens
from ..config import CacherConfig
from ..errors import InputError
from ..tokens import token_cosine
from .real_footage import CLIP_KINDS, StreamSpec, load_stream, tower_grid

MAX_GAP = 8  # frames a reference may serve
REUSE_RATIOS = (0.1, 0.25, 0.5)
COST_STEP = 0.002  # cost resolution of the schedule search (share of a full frame)


@dataclass
class ActionTable:
    """Every action's cosine to the full forward, per frame, and its cost."""

    frames: int
    max_gap: int = MAX_GAP  # frames a reference may serve
    reuse: dict[tuple[int, int, float], float] = field(default_factory=dict)  # (reference, frame, ratio)
    reuse_cost: dict[float, float] = field(default_factory=dict)
    skip: dict[tuple[int, int], float] = field(default_factory=dict)  # (reference, frame)
    downscale: list[list[tuple[float, float, str]]] = field(default_factory=list)  # per frame: (cosine, cost, grid)

    def options(self, frame: int, reference: int | None) -> list[tuple[float, float, int | None, str]]:
        """(cosine, cost, reference afterwards, label) of every action on `frame`."""
        out = [(1.0, 1.0, frame, "R")]
        if reference is not None and frame - reference <= self.max_gap:
            out += [(self.reuse[(reference, frame, r)], cost, reference, f"reuse {r:g}") for r, cost in self.reuse_cost.items()]
            out.append((self.skip[(reference, frame)], 0.0, reference, "skip"))
        out += [(cosine, cost, reference, f"downscale {grid}") for cosine, cost, grid in self.downscale[frame]]
        return out


def measure_actions(tower: torch.nn.Module, pixel_values: torch.Tensor, ratios: tuple[float, ...] = REUSE_RATIOS,
                    max_gap: int = MAX_GAP) -> ActionTable:
    """Run every action on every frame of `pixel_values` [F, 3, H, W] through the tower (real forwards)."""
    prefix, frames = prefix_tokens(tower), len(pixel_values)
    table = ActionTable(frames, max_gap)
    with torch.inference_mode():
        full = torch.cat([tower(pixel_values=f[None]).last_hidden_state for f in pixel_values])[:, prefix:]
        for ratio in ratios:
            for reference in range(frames):
                cacher = STCCacher(CacherConfig(cache_interval=frames + 1, update_ratio=ratio)).attach(tower)
                tower(pixel_values=pixel_values[reference][None])
                for frame in range(reference + 1, min(frames, reference + max_gap + 1)):
                    spent, whole = cacher.stats.flops, cacher.stats.full_flops
                    out = tower(pixel_values=pixel_values[frame][None]).last_hidden_state[:, prefix:]
                    table.reuse[(reference, frame, ratio)] = float(token_cosine(out, full[frame][None]))
                    table.reuse_cost[ratio] = (cacher.stats.flops - spent) / (cacher.stats.full_flops - whole)
                cacher.detach()
        for reference in range(frames):
            for frame in range(reference + 1, min(frames, reference + max_gap + 1)):
                table.skip[(reference, frame)] = float(token_cosine(full[reference], full[frame]))
        table.downscale = [[] for _ in range(frames)]
        side = math.isqrt(full.shape[1])
        width, mlp = full.shape[-1], mlp_width(encoder_layers(tower)[0])
        for small in range(math.ceil(side * MIN_SIDE_SHARE), side):
            encoder = UniformDownscaling(downscale_cost((small, small), (side, side), prefix, width, mlp))
            out = encoder(tower, pixel_values)[:, prefix:]
            for frame, cosine in enumerate(token_cosine(out, full).tolist()):
                table.downscale[frame].append((cosine, encoder.flop_ratio(), f"{small}x{small}"))
    return table


@dataclass
class Schedule:
    """A schedule's per-frame cosines, mean cost and actions."""

    cosines: list[float]
    cost: float
    actions: list[str]


def best_mean_schedule(table: ActionTable, budget: float, skip: bool = True, step: float = COST_STEP) -> Schedule:
    """The schedule with the highest mean cosine whose total cost is at most budget x frames.

    Dynamic programme over (frame, reference) keeping, per cost bucket of `step`, the best cosine
    sum; buckets beaten by a cheaper one are pruned. Costs are rounded up to buckets, so a schedule
    found is always within the budget."""
    cap = math.floor(budget * table.frames / step + 1e-9)
    states: dict[int | None, dict[int, tuple[float, tuple]]] = {None: {0: (0.0, ())}}
    for frame in range(table.frames):
        following: dict[int | None, dict[int, tuple[float, tuple]]] = {}
        options = {reference: [o for o in table.options(frame, reference) if skip or o[3] != "skip"] for reference in states}
        for reference, front in states.items():
            for bucket, (total, path) in front.items():
                for cosine, cost, after, label in options[reference]:
                    spent = bucket + math.ceil(cost / step - 1e-9)
                    if spent > cap:
                        continue
                    slot = following.setdefault(after, {})
                    if spent not in slot or slot[spent][0] < total + cosine:
                        slot[spent] = (total + cosine, path + ((cosine, cost, label),))
        states = {reference: _pareto(front) for reference, front in following.items()}
    total, path = max((entry for front in states.values() for entry in front.values()), key=lambda entry: entry[0])
    return Schedule([c for c, _, _ in path], sum(cost for _, cost, _ in path) / table.frames, [label for _, _, label in path])


def _pareto(front: dict[int, tuple[float, tuple]]) -> dict[int, tuple[float, tuple]]:
    """Keep the cost buckets whose cosine sum beats every cheaper bucket's."""
    kept, best = {}, -math.inf
    for bucket in sorted(front):
        if front[bucket][0] > best:
            kept[bucket], best = front[bucket], front[bucket][0]
    return kept


def best_worst_frame(table: ActionTable, budget: float, skip: bool = True, tolerance: float = 1e-4) -> float:
    """The highest cosine every frame can keep at once within the budget (bisection over the floor,
    each floor checked by a minimum-cost programme over (frame, reference))."""
    def cheapest(floor: float) -> float:
        states: dict[int | None, float] = {None: 0.0}
        for frame in range(table.frames):
            following: dict[int | None, float] = {}
            for reference, spent in states.items():
                for cosine, cost, after, label in table.options(frame, reference):
                    if cosine >= floor and (skip or label != "skip") and spent + cost < following.get(after, math.inf):
                        following[after] = spent + cost
            if not following:
                return math.inf
            states = following
        return min(states.values())

    low, high = 0.0, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if cheapest(middle) <= budget * table.frames + 1e-9 else (low, middle)
    return low


def bound_rows(table: ActionTable, budgets: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per budget: the best-mean schedule's statistics (with and without skipping) and the best worst frame."""
    rows = []
    for budget in budgets:
        best, no_skip = best_mean_schedule(table, budget), best_mean_schedule(table, budget, skip=False)
        cosines = np.asarray(best.cosines)
        rows.append({"budget": budget, "cost": best.cost, "cosine_mean": float(cosines.mean()),
                     "cosine_p10": float(np.percentile(cosines, 10)), "cosine_min": float(cosines.min()),
                     "per_frame_cosine": best.cosines, "actions": best.actions,
                     "cosine_mean_without_skip": float(np.mean(no_skip.cosines)),
                     "best_worst_frame": best_worst_frame(table, budget)})
    return rows


def pooled_bound(streams: list[dict[str, Any]], budgets: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per budget over every stream's frames: the best-mean schedules' mean, 10th percentile and worst,
    and the lowest of the streams' best worst frames."""
    pooled = []
    for index, budget in enumerate(budgets):
        rows = [stream["rows"][index] for stream in streams]
        cosines = np.concatenate([row["per_frame_cosine"] for row in rows])
        pooled.append({"budget": budget, "frames": len(cosines), "cosine_mean": float(cosines.mean()),
                       "cosine_p10": float(np.percentile(cosines, 10)), "cosine_min": float(cosines.min()),
                       "best_worst_frame": min(row["best_worst_frame"] for row in rows)})
    return pooled


def run_bound(streams: list[StreamSpec], budgets: tuple[float, ...], tower: torch.nn.Module, normalize: Callable,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every stream measured and bounded at every budget."""
    results = []
    for spec in streams:
        if progress is not None:
            progress(spec.label)
        images, _, records = load_stream(spec, tower_grid(tower, normalize))
        table = measure_actions(tower, normalize(torch.from_numpy(images)))
        results.append({"stream": spec.label, "kind": CLIP_KINDS.get(spec.clip, "user clip"), "frames": table.frames,
                        "frames_record": records, "rows": bound_rows(table, budgets)})
    return {"benchmark": "cacher bound", "budgets": list(budgets), "streams": results,
            "pooled": pooled_bound(results, budgets)}


def curves(vit_report: dict[str, Any], bound_report: dict[str, Any], by: str = "kind") -> list[dict[str, Any]]:
    """Every variant of a `bench vit --weights` report beside the bound at each budget, over the frames
    of each kind of footage (`by="kind"`) or each stream (`by="stream"`) pooled: FLOP ratio
    (frame-weighted), cosine mean, 10th percentile and worst; the bound's rows also carry the best worst
    frame. Streams are matched by their label ("demo at 1 fps"); the vit report must hold every stream
    of the bound."""
    missing = missing_streams(vit_report, [s["stream"] for s in bound_report["streams"]])
    if missing:
        raise InputError(f"the vit report lacks the streams {missing}; run both on the same --streams")
    runs = {StreamSpec(run["video"], run["fps"]).label: run for run in vit_report["runs"]}
    groups: dict[str, list[dict[str, Any]]] = {}
    for stream in bound_report["streams"]:
        groups.setdefault(stream["kind"] if by == "kind" else stream["stream"], []).append(stream)
    out = []
    for name, streams in groups.items():
        variants = [v["name"] for v in runs[streams[0]["stream"]]["variants"] if v["name"] != "full"]
        rows = []
        for variant in variants:
            picked = [next(v for v in runs[s["stream"]]["variants"] if v["name"] == variant) for s in streams]
            rows.append(_pooled_row(variant, [v["per_frame_token_cosine"] for v in picked], [v["flop_ratio"] for v in picked]))
        for index, budget in enumerate(bound_report["budgets"]):
            picked = [s["rows"][index] for s in streams]
            row = _pooled_row(f"bound, budget {budget:g}", [r["per_frame_cosine"] for r in picked], [r["cost"] for r in picked])
            rows.append(row | {"best_worst_frame": min(r["best_worst_frame"] for r in picked)})
        out.append({"group": name, "streams": [s["stream"] for s in streams], "frames": sum(s["frames"] for s in streams),
                    "rows": rows})
    return out


def missing_streams(vit_report: dict[str, Any], labels: list[str]) -> list[str]:
    """The stream labels ("demo at 1 fps") a `bench vit --weights` report has no run for."""
    have = {StreamSpec(run.get("video"), run.get("fps", 0)).label for run in vit_report.get("runs", [])}
    return [label for label in labels if label not in have]


def _pooled_row(name: str, cosines: list[list[float]], costs: list[float]) -> dict[str, Any]:
    pooled = np.concatenate([np.asarray(c, dtype=np.float64) for c in cosines])
    return {"name": name, "flop_ratio": float(np.average(costs, weights=[len(c) for c in cosines])),
            "cosine_mean": float(pooled.mean()), "cosine_p10": float(np.percentile(pooled, 10)),
            "cosine_min": float(pooled.min())}


# The families of `curves` rows the plot draws, by name prefix: (prefix, legend label, colour, marker).
CURVE_FAMILIES = (
    ("stc N=", "stc N= (the paper's fixed schedule)", "tab:blue", "o"),
    ("robust (", "robust profile (N=2/N=4 budgets)", "tab:orange", "s"),
    ("skip frames", "skip frames", "tab:green", "^"),
    ("drop tokens", "drop tokens", "tab:red", "v"),
    ("codec skip", "codec skip", "tab:purple", "D"),
    ("downscale every frame", "downscale every frame", "tab:brown", "P"),
    ("bound, budget", "bound (clairvoyant)", "black", "*"),
)


def curve_family(name: str) -> str:
    """The family prefix of a `curves` row's name; "other" for the rest (adaptive rows, the robust
    profile's no-hints and codec-token ablations)."""
    if name.startswith("robust (") and ("no hints" in name or "codec" in name):
        return "other"
    return next((prefix for prefix, *_ in CURVE_FAMILIES if name.startswith(prefix)), "other")


def plot_curves(groups: list[dict[str, Any]], path: str | Path) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """Cosine mean (top row) and 10th percentile (bottom row) against FLOP ratio, one column per group of
    `curves` (a kind of footage), each family of variants one colour and marker joined in FLOP order and
    the bound a thick black line, one legend below: readable where a per-stream scatter of every variant
    is not. Variants of no family are small grey points without a legend entry; the full-forward
    control (cosine 1 at cost 1) is left out.
    Returns what is drawn: per group, per family ("other" for the rest), its (FLOP ratio, cosine mean,
    cosine p10) sorted by FLOP ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for group in groups:
        families = drawn.setdefault(group["group"], {})
        for row in (row for row in group["rows"] if not row["name"].startswith("full")):
            point = (row["flop_ratio"], row["cosine_mean"], row["cosine_p10"])
            families.setdefault(curve_family(row["name"]), []).append(point)
        for points in families.values():
            points.sort()
    style = {prefix: (label, colour, marker) for prefix, label, colour, marker in CURVE_FAMILIES}
    figure, axes = plt.subplots(2, len(groups), figsize=(max(8.0, 4.2 * len(groups)), 8.0), squeeze=False, sharex="col")
    legend: dict[str, Any] = {}
    for col, group in enumerate(groups):
        for row, (index, ylabel) in enumerate(((1, "patch-token cosine mean"), (2, "cosine 10th percentile"))):
            ax = axes[row][col]
            for family, points in drawn[group["group"]].items():
                x, y = [p[0] for p in points], [p[index] for p in points]
                if family == "other":
                    ax.scatter(x, y, s=9, color="0.6", zorder=1)
                    continue
                label, colour, marker = style[family]
                bound = family == "bound, budget"
                (line,) = ax.plot(x, y, color=colour, marker=marker, lw=3.0 if bound else 1.3, ms=9 if bound else 5,
                                  zorder=3 if bound else 2)
                legend.setdefault(label, line)
            ax.grid(alpha=0.3)
            ax.set_ylabel(ylabel)
            if row == 0:
                streams = len(group["streams"])
                ax.set_title(f"{group['group']} ({streams} stream{'s' * (streams > 1)}, {group['frames']} frames)", fontsize=9)
            else:
                ax.set_xlabel("FLOP ratio to the full tower")
    ordered = [label for _, label, *_ in CURVE_FAMILIES if label in legend]
    figure.legend([legend[label] for label in ordered], ordered, loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return drawn


__all__ = ["ActionTable", "COST_STEP", "CURVE_FAMILIES", "MAX_GAP", "REUSE_RATIOS", "Schedule", "best_mean_schedule",
           "best_worst_frame", "bound_rows", "curve_family", "curves", "measure_actions", "missing_streams",
           "plot_curves", "pooled_bound", "run_bound"]
