"""Entry point of the tuner's worker subprocesses (``python -m scanopt.autotune._worker``).

``work SPEC_JSON``: the ask/tell loop of one study; ``rebench SPEC_JSON CONFIGS_JSON ROUNDS OUT``:
re-time configs interleaved and write the times to ``OUT``. Not a user-facing command.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from scanopt.autotune.tuner import StudySpec, rebench_main, worker_main

    mode, spec = argv[0], StudySpec.from_json(argv[1])
    if mode == "work":
        return worker_main(spec)
    if mode == "rebench":
        return rebench_main(spec, json.loads(argv[2]), int(argv[3]), argv[4])
    raise SystemExit(f"unknown worker mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
