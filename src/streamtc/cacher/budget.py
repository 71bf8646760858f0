"""How a refresh="budget" Cacher spends its FLOP budget, chunk by chunk: pure decisions on numbers.

The paper's fixed schedule refreshes every N-th chunk whatever the footage does, so on real weights it
keeps 0.95-0.99 of the full forward on steady footage and collapses (0.3-0.7) on the frames after a
cut or fast motion, where encoding every frame at a lower resolution at the same cost keeps above 0.9
(docs/benchmarks.md). A budget Cacher spends the same FLOPs where they buy the most:

- the reference still describes the frame (not stale): reuse it (the paper's non-refresh chunk), and
  refresh early once a refresh and a margin are banked, so that still scenes do not leave the budget
  unspent;
- the reference is stale and a refresh is affordable: refresh, except in a run of cuts (this chunk
  and the previous one both cuts), where a new reference would be stale at once;
- stale and a refresh is not affordable: encode the frame whole at a lower resolution (a downscaled
  encode: every part of the picture seen, fewer tokens), always at the same steady cost, the budget
  less STEADY_MARGIN. The frames a stale reference cannot serve then all keep one grid's fidelity,
  instead of the smaller grids a spend tied to the credit would give the frames right after a
  refresh, and the margin saved on each pays for the next refresh.

Credit is counted in units of this chunk's full cost: what the budget allows on every prefix of the
stream (budget x the full cost of all chunks so far, this one included) minus what was spent. A
refresh needs a whole chunk of credit; a downscaled encode may borrow, but never more than one
refresh less one chunk's budget, so on every prefix a stream runs ahead of its budget by at most
that (as it does after the first chunk, which must refresh).
"""

from __future__ import annotations

from typing import NamedTuple

# Credit a non-stale chunk must hold beyond a full refresh before it refreshes early: spending
# surplus on a refresh beats carrying it, and the margin keeps one non-refresh chunk in reserve.
SPEND_MARGIN = 0.2
# What a downscaled encode leaves of the budget, as a share of a full chunk: it pays for the refreshes
# that let reuse resume once the scene settles (on the tuning clips, 0.05-0.1 lost the fewest streams
# to the trivial baselines; docs/benchmarks.md).
STEADY_MARGIN = 0.1
# The youngest reference an early (surplus) refresh replaces, in chunks.
MIN_SPEND_AGE = 2
# With codec hints, the pixel change (as a share of stale_threshold) that is stale on its own, and
# the one a codec change above stale_share needs beside it (see `is_stale`).
HINTED_PIXEL_ALONE = 1.2
HINTED_PIXEL_FLOOR = 0.6


class BudgetSignals(NamedTuple):
    """What the Cacher knows about a chunk before encoding it.

    stale: the reference no longer describes the chunk (codec change since the reference, or the
        pixel change to it, above the configured threshold); also true without a reference.
    cut: the chunk starts a new shot (a codec cut, or the pixel change to the previous frame above
        cut_threshold).
    previous_cut: the previous chunk was a cut.
    age: chunks since the reference was made (0 without one).
    has_reference: a reference exists and fits the chunk.
    """

    stale: bool
    cut: bool
    previous_cut: bool
    age: int
    has_reference: bool


class BudgetDecision(NamedTuple):
    """What to do with the chunk: "refresh", "reuse" or "downscale" (spending at most `spend` of the
    chunk's full cost); `reason` says why, for stats and logs."""

    action: str
    spend: float = 0.0
    reason: str = ""


def is_stale(pixel_change: float, codec_change: float | None, threshold: float, share: float) -> bool:
    """Whether the reference no longer describes the chunk.

    pixel_change: the relative pixel change to the reference frame; codec_change: the share of the
    patch area the decoder saw change since the reference (1 after a cut), None without hints.
    Without hints the pixels decide (above `threshold`). With hints, a cut or a large pixel change
    (above HINTED_PIXEL_ALONE x threshold) is stale on its own, and a codec change above `share` needs
    the pixels to agree (above HINTED_PIXEL_FLOOR x threshold): a hand-held camera moves every block a
    little, which the decoder reports as change everywhere while reuse still works, and a textured
    object sliding over a flat background changes the features far more than the mean pixel.
    """
    if codec_change is None:
        return pixel_change > threshold
    return (codec_change >= 1.0 or pixel_change > HINTED_PIXEL_ALONE * threshold
            or (codec_change > share and pixel_change > HINTED_PIXEL_FLOOR * threshold))


def credit(budget: float, spent_flops: float, full_flops_so_far: float, chunk_full_flops: float) -> float:
    """The chunk's allowance in units of its own full cost: budget x (all full cost so far + this
    chunk's) minus the FLOPs already spent, divided by this chunk's full cost."""
    return (budget * (full_flops_so_far + chunk_full_flops) - spent_flops) / chunk_full_flops


def decide(signals: BudgetSignals, allowance: float, budget: float) -> BudgetDecision:
    """The chunk's action (see the module docstring).

    allowance: `credit(...)` for this chunk; budget: the stream's FLOP budget (a share of full).
    """
    if not signals.has_reference:
        return BudgetDecision("refresh", reason="no reference")
    if not signals.stale:
        if allowance >= 1.0 + SPEND_MARGIN and signals.age >= MIN_SPEND_AGE:
            return BudgetDecision("refresh", reason="surplus")
        return BudgetDecision("reuse")
    if allowance >= 1.0 and not (signals.cut and signals.previous_cut):
        return BudgetDecision("refresh", reason="cut" if signals.cut else "stale")
    steady = min(budget - STEADY_MARGIN, allowance + 1.0 - budget)  # borrow at most a refresh less a chunk
    return BudgetDecision("downscale", spend=max(steady, 0.0), reason="cut" if signals.cut else "stale")


__all__ = ["BudgetDecision", "BudgetSignals", "credit", "decide", "is_stale", "HINTED_PIXEL_ALONE", "HINTED_PIXEL_FLOOR",
           "MIN_SPEND_AGE", "SPEND_MARGIN", "STEADY_MARGIN"]
