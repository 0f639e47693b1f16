"""Prepare one of the paper's public datasets as a verl parquet file: read the rows, convert them,
write and validate the file, report what was kept; also the CLI behind ``scripts/data/prepare.py``.

``python scripts/data/prepare.py NAME --output DIR`` (or ``python -m l2t_verl.data_prep ...``)
prepares dataset ``NAME`` of :data:`l2t_verl.data_sources.DATASETS`, which lists the hub ids and
the columns each one needs.  By default the rows come from the Hugging Face hub
(``datasets.load_dataset``); ``--input FILE`` reads a local ``.json``/``.jsonl``/``.parquet``/``.csv``
file with the same columns instead (JSON and CSV also gzipped, e.g. the official
``HumanEval.jsonl.gz``; no network, this is what the tests use).

Output: ``DIR/<split>.parquet`` (``train`` for the two training sets, ``test`` for the benchmarks)
with verl's columns::

    data_source   e.g. "aime2024" (resolves to a verifier in l2t_verl.scoring)
    prompt        [{"role": "user", "content": problem + " " + INSTRUCTION}]
    ability       "math" or "code"
    reward_model  {"style": "rule", "ground_truth": answer}
    extra_info    {"split", "index", "source_index", plus what the dataset knows: year, tier, ...}

Rows that cannot be converted (empty problem, no answer, unreadable year or difficulty) are skipped
and counted by reason; the CLI prints the counts and the first skipped row numbers.  Rows outside a
dataset's intended subset (AIME years outside 1989-2023) are counted as filtered.  If nothing is
left, a required column is missing or the file cannot be read, :class:`DataPrepError` says so in
one line naming the file (and the column or line).  Every written file is checked with
:func:`l2t_verl.dataset.validate_dataset`.  How many AIME 1989-2023 rows come out depends on the
hub revision (the paper reports 919); the CLI prints the count.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l2t_verl.arith_task import write_dataset
from l2t_verl.data_sources import DATASETS, DatasetSpec, SkipRow
from l2t_verl.dataset import DatasetError, validate_dataset

_SKIPPED_ROWS_SHOWN = 10


class DataPrepError(ValueError):
    """A dataset that cannot be prepared; the message is one line naming the file and the column."""


@dataclass
class PrepReport:
    """What :func:`prepare` did: rows read, written, filtered and skipped (by reason and row)."""

    name: str
    source: str
    path: Path
    rows_read: int = 0
    rows_written: int = 0
    filtered: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_rows: list[int] = field(default_factory=list)
    requested_size: int | None = None

    def summary(self) -> str:
        text = (
            f"{self.name}: read {self.rows_read} rows from {self.source}, "
            f"wrote {self.rows_written} to {self.path}"
        )
        if self.filtered:
            text += f"; filtered out {self.filtered}"
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            shown = ", ".join(map(str, self.skipped_rows[:_SKIPPED_ROWS_SHOWN]))
            more = ", ..." if len(self.skipped_rows) > _SKIPPED_ROWS_SHOWN else ""
            text += f"; skipped {sum(self.skipped.values())} ({reasons}; rows {shown}{more})"
        if self.requested_size is not None and self.rows_written < self.requested_size:
            text += f"; WARNING: asked for {self.requested_size}, only {self.rows_written} usable"
        return text


# ------------------------------------------------------------------------------ reading


# Local input formats; JSON and CSV may also be gzipped (``.jsonl.gz``: the official HumanEval file).
_TEXT_TYPES = (".json", ".jsonl", ".csv")
_FILE_TYPES = ".json, .jsonl, .parquet or .csv (JSON and CSV may be gzipped: .jsonl.gz, ...)"


def _file_type(path: Path) -> tuple[str, bool]:
    """``(type suffix, gzipped)``, e.g. ``(".jsonl", True)`` for ``HumanEval.jsonl.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        return (suffixes[-2] if len(suffixes) > 1 else ""), True
    return (suffixes[-1] if suffixes else ""), False


def _read_text(path: Path, gzipped: bool) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataPrepError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if gzipped:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:  # bad header / truncated / corrupt stream
            raise DataPrepError(f"{path}: not a readable gzip file ({exc})") from None
    try:
        # utf-8-sig: a leading byte-order mark (common in files saved on Windows) is not data.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataPrepError(f"{path}: line {line}: not UTF-8 text") from None


def _json_rows(path: Path, text: str, whole_document: bool) -> list[dict[str, Any]]:
    if whole_document:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one document: JSON lines under a .json name
        if data is not None:
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataPrepError(f"{path}: expected a JSON list of objects (or JSON lines)")
            return data
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028 or U+0085, which
    # splitlines() would treat as line ends.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataPrepError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataPrepError(f"{path}: line {lineno}: expected a JSON object")
        rows.append(record)
    return rows


def read_local(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local ``.json`` (a list of objects, or JSON lines as ``Dataset.to_json`` writes
    them), ``.jsonl``, ``.parquet`` or ``.csv`` file (CSV cells are read as text); JSON and CSV
    files may be gzipped (``.json.gz``, ``.jsonl.gz``, ``.csv.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise DataPrepError(f"{path}: file not found")
    kind, gzipped = _file_type(path)
    if gzipped and kind not in _TEXT_TYPES:
        raise DataPrepError(f"{path}: unsupported file type {kind + '.gz'!r} (use {_FILE_TYPES})")
    if kind in (".json", ".jsonl"):
        return _json_rows(path, _read_text(path, gzipped), whole_document=kind == ".json")
    if kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DataPrepError(f"{path}: not a readable parquet file ({exc})") from None
    if kind == ".csv":
        import io

        import pandas as pd

        text = _read_text(path, gzipped)
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except Exception as exc:  # pandas' parser errors have no common base
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise DataPrepError(f"{path}: not a readable CSV file ({first_line})") from None
        return frame.to_dict(orient="records")
    raise DataPrepError(f"{path}: unsupported file type {kind!r} (use {_FILE_TYPES})")


def read_hub(spec: DatasetSpec) -> Sequence[Mapping[str, Any]]:
    """The hub dataset (indexable rows; not materialised, NuminaMath-CoT has ~860k rows)."""
    try:
        from datasets import load_dataset

        return load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except Exception as exc:  # network, auth and format errors all end here
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise DataPrepError(
            f"{spec.hub_id}: cannot load split {spec.hub_split!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {first_line}); pass --input FILE to use a local copy"
        ) from None


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


# ------------------------------------------------------------------------------ preparing


def prepare(
    name: str,
    output_dir: str | Path,
    input_path: str | Path | None = None,
    size: int | None = None,
    seed: int = 0,
) -> PrepReport:
    """Convert dataset ``name`` (a key of :data:`DATASETS`) and write ``output_dir/<split>.parquet``.

    ``size`` (default: the spec's, e.g. 4000 for NuminaMath) takes a seeded random sample: rows are
    visited in the order of a ``random.Random(seed)`` shuffle and the first ``size`` usable ones are
    kept, so the same seed and input always give the same file.
    """
    if name not in DATASETS:
        raise DataPrepError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    size = spec.default_size if size is None else size
    if size is not None and size <= 0:
        raise DataPrepError(f"--size must be positive, got {size}")
    if input_path is not None:
        source = str(input_path)
        rows: Sequence[Mapping[str, Any]] = read_local(input_path)
    else:
        source = f"hf://{spec.hub_id} ({spec.hub_split})"
        rows = read_hub(spec)
    if len(rows) == 0:
        raise DataPrepError(f"{source}: no rows")
    present = _columns(rows)
    for column in spec.columns:
        if column not in present:
            raise DataPrepError(f"{source}: missing column {column!r} needed by {name} (has {present})")

    order: Sequence[int] = range(len(rows))
    if size is not None:
        order = list(order)
        random.Random(seed).shuffle(order)
    path = Path(output_dir) / f"{spec.output_split}.parquet"
    report = PrepReport(name, source, path, requested_size=size)
    out: list[dict[str, Any]] = []
    for i in order:
        if size is not None and len(out) >= size:
            break
        report.rows_read += 1
        row = rows[i]
        try:
            converted = spec.convert(row if isinstance(row, Mapping) else dict(row))
        except SkipRow as reason:
            report.skipped[str(reason)] += 1
            report.skipped_rows.append(i)
            continue
        if converted is None:
            report.filtered += 1
            continue
        out.append(
            {
                "data_source": spec.data_source,
                "prompt": [{"role": "user", "content": converted.problem}],
                "ability": spec.ability,
                "reward_model": {"style": "rule", "ground_truth": converted.ground_truth},
                "extra_info": {
                    "split": spec.output_split,
                    "index": len(out),
                    "source_index": i,
                    **converted.extra,
                },
            }
        )
    report.skipped_rows.sort()
    if not out:
        detail = ", ".join(f"{n} {r}" for r, n in sorted(report.skipped.items())) or "none usable"
        raise DataPrepError(
            f"{source}: no usable rows for {name} (read {report.rows_read}, filtered {report.filtered}, "
            f"skipped: {detail})"
        )
    write_dataset(out, path)
    try:
        written = validate_dataset(path)
    except DatasetError as exc:
        raise DataPrepError(f"{path}: written file does not validate: {exc}") from None
    report.rows_written = written
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a public dataset into verl parquet (DIR/train.parquet or DIR/test.parquet).",
        epilog="datasets: " + ", ".join(f"{n} ({s.hub_id})" for n, s in DATASETS.items()),
    )
    parser.add_argument("dataset", choices=sorted(DATASETS), metavar="DATASET", help="one of: %(choices)s")
    parser.add_argument("--output", required=True, help="directory for the parquet file")
    parser.add_argument(
        "--input",
        default=None,
        help="local .json/.jsonl/.parquet/.csv (JSON and CSV may be .gz) instead of the hub",
    )
    parser.add_argument("--size", type=int, default=None, help="seeded random sample of this many rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = prepare(args.dataset, args.output, args.input, args.size, args.seed)
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
