"""`python -m cnnkit ...`: the same command line as `cnnkit` (torchrun's data-parallel processes start this way)."""

from cnnkit.cli import console_main

console_main()
