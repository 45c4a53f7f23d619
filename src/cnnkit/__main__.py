"""`python -m cnnkit ...` (what torchrun launches)."""

from cnnkit.cli import main

raise SystemExit(main())
