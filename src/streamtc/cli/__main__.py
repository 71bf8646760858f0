"""`python -m streamtc.cli`: the `streamtc` command."""

from . import main

main()
