#!/usr/bin/env python
"""Compare evaluation runs written by scripts/eval/evaluate.py.

    python scripts/eval/compare.py RUN_DIR [RUN_DIR ...] --output DIR [--names grpo,l2t]

Writes comparison.csv / .md / .json / .png to DIR (token use relative to the first run) and prints
the table. A thin wrapper over :func:`l2t_verl.evaluation.compare`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout without install

from l2t_verl.evaluation import EvaluationError, compare, load_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (each with a result.json)")
    p.add_argument("--output", required=True, help="directory for the comparison files")
    p.add_argument("--names", help="comma-separated run names (default: the names stored in the runs)")
    args = p.parse_args(argv)
    try:
        names = [x.strip() for x in args.names.split(",")] if args.names else None
        if names is not None and len(names) != len(args.runs):
            raise EvaluationError(f"--names: {len(names)} names for {len(args.runs)} runs")
        if names is not None and len(set(names)) != len(names):
            raise EvaluationError(f"--names: duplicate run names in {args.names!r}")
        # Per-sample records are not needed for the table and can be large.
        results = [load_result(run, with_samples=False) for run in args.runs]
        if names is not None:
            compare(dict(zip(names, results, strict=True)), args.output)
        else:
            compare(results, args.output)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write((Path(args.output) / "comparison.md").read_text())
    print(f"comparison: {Path(args.output).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
