"""``python -m scanopt`` runs the command-line interface."""

from scanopt.cli import main

raise SystemExit(main())
