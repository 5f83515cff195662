"""``python -m vitdecomp`` (also ``torchrun -m vitdecomp``) runs the CLI."""
from vitdecomp.cli.main import main

raise SystemExit(main())
