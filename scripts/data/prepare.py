#!/usr/bin/env python
"""Prepare one dataset as verl parquet: ``python scripts/data/prepare.py NAME --output DIR``.

NAME is one of aime_1989_2023, numina, aime24, aime25, amc23, math500, minerva, omni_math,
humaneval; ``--input FILE`` reads a local copy instead of the Hugging Face hub (.json, .jsonl,
.parquet or .csv; JSON and CSV may be gzipped, e.g. HumanEval.jsonl.gz), ``--size N --seed S``
takes a seeded sample (NuminaMath: 4000 by default).  See :mod:`l2t_verl.data_sources` for the hub
ids and the columns each dataset needs, and :mod:`l2t_verl.data_prep` for the output layout.
"""

from l2t_verl.data_prep import main

if __name__ == "__main__":
    raise SystemExit(main())
