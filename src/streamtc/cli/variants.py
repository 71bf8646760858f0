"""`streamtc variants`: the named compression variants that `run --variant`, `eval run --variant`
and `bench pipeline --variants` take (`streamtc.variants`)."""

from __future__ import annotations

from rich.table import Table

from .common import console


def print_variants(title: str) -> None:
    """The registry as a table: name, what it is, its exact settings."""
    from ..variants import VARIANTS

    table = Table(title=title)
    for column in ("name", "what it is", "settings"):
        table.add_column(column)
    for variant in VARIANTS.values():
        table.add_row(variant.name, variant.description, variant.describe())
    console.print(table)


def variants() -> None:
    """List the named variants: STC, its halves and the baselines it is compared with."""
    print_variants("variants (run --variant, eval run --variant, bench pipeline --variants)")


__all__ = ["print_variants", "variants"]
