"""The events a stream publishes to its subscribers (the web page's charts and overlay): what one
frame cost and what STC did with it."""

from __future__ import annotations

from typing import Any

from ..session import StreamingSession


def frame_event(session: StreamingSession, before: Any, after: Any, number: int, timestamp: float,
                kv_bytes_per_token: int) -> dict[str, Any]:
    """The event of frame `number`, from the session's stats before and after it: timings, the Cacher's recomputation, the Pruner's kept positions, and
    the tokens the stream holds (in the KV cache, plus kept tokens waiting for their pre-fill).

    Token maps are of the first pruner frame of the chunk the frame completed (None when it
    completed none, e.g. the first frame of a Qwen-VL temporal patch): `pruner.kept`, positions
    in the pruner's [rows, cols] grid; `cacher.recomputed`, per cell of the tower's patch grid
    [rows, cols] (row-major), in how many of the `layers` layers the Cacher recomputed that
    token (None when the chunk refreshed: every token in every layer)."""
    encoded = after.visual_tokens_encoded - before.visual_tokens_encoded
    cacher = None
    if after.cacher is not None:
        tokens = after.cacher["tokens_per_frame"]
        recomputed = after.cacher["recomputed_tokens_per_layer"]
        previous = (before.cacher or {}).get("recomputed_tokens_per_layer") or [0] * len(recomputed)
        record = session.last_recomputed if encoded else None
        counts = None if record is None else record.counts()
        cacher = {
            "refresh": after.cacher["refresh_chunks"] > (before.cacher or {}).get("refresh_chunks", 0),
            "recomputed_per_layer": [a - b for a, b in zip(recomputed, previous)],
            "tokens": tokens, "layers": len(recomputed),
            "grid": None if record is None else list(record.grid),
            "recomputed": None if counts is None else counts[0].tolist(),
        }
    kept = session.last_kept_indices if encoded else None
    grid = session.last_pruner_grid
    return {
        "type": "frame", "frame": number, "timestamp": timestamp,
        "vit_ms": after.vit_ms - before.vit_ms, "prune_ms": after.prune_ms - before.prune_ms,
        "prefill_ms": after.prefill_ms - before.prefill_ms,
        "pruner": None if kept is None else {"kept": kept[0], "tokens": encoded, "grid": list(grid)},
        "cacher": cacher,
        "tokens_encoded": encoded, "tokens_kept": encoded if kept is None else len(kept[0]),
        "cache_tokens": after.kv_cache_bytes // kv_bytes_per_token + after.pending_tokens,
        "visual_tokens": after.visual_tokens,
        "pending_tokens": after.pending_tokens, "kv_cache_bytes": after.kv_cache_bytes,
    }


__all__ = ["frame_event"]
