"""`streamtc presets`: the built-in architectures (random weights) that `run`, `bench` and `eval` take."""

from __future__ import annotations

from rich.table import Table

from .common import console


def presets() -> None:
    """List the built-in architecture presets with their full-depth sizes."""
    from ..presets import PRESETS, build_config

    table = Table(title="presets (random weights, real architectures)")
    for column in ("name", "parameters", "vision / text layers", "description"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    for preset in PRESETS.values():
        config = build_config(preset.name)
        text = getattr(config, "text_config", None)
        vision = getattr(config, "vision_config", config)
        layers = f"{vision.num_hidden_layers}" + (f" / {text.num_hidden_layers}" if text is not None else "")
        count = preset.parameter_count()
        size = f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.2f} M"
        table.add_row(preset.name, size, layers, preset.description)
    console.print(table)



__all__ = ["presets"]
