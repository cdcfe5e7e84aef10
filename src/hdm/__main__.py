"""`python -m hdm` is the `hdm` command (and `torchrun -m hdm fit ...` a data-parallel fit)."""

from ._cli import main

main(prog_name="hdm")
