"""``python -m scanopt.bench [options]`` is ``scanopt bench [options]`` (also before the main CLI
wires the sub-command in)."""

import sys

from scanopt.bench.cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))
