"""`python -m cnnkit ...`: the same command line as `cnnkit` (one process; multi-process training is not built yet)."""

from cnnkit.cli import main

raise SystemExit(main())
