"""Turn the paper's public datasets into verl parquet files for training and evaluation.

One registry entry per dataset (:data:`DATASETS`); ``scripts/data/prepare.py NAME --output DIR``
runs one of them.  By default the rows come from the Hugging Face hub (``datasets.load_dataset``);
``--input FILE`` reads a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file with the same
columns instead (no network; this is what the tests use).

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
left, or a required column is missing, :class:`DataPrepError` says so in one line naming the file
and the column.  Every written file is checked with :func:`l2t_verl.dataset.validate_dataset`.

Hub sources and the columns used (rows are read by column name, so extra columns are ignored):

============== ================================ ===== =============================================
name           hub id                           split columns
============== ================================ ===== =============================================
aime_1989_2023 di-zhang-fdu/AIME_1983_2024      train Year, Question, Answer (+ Problem Number,
                                                      Part, ID); years 1989-2023 kept
numina         AI-MO/NuminaMath-CoT             train problem, solution (answer = its last
                                                      \\boxed{}) (+ source); seeded sample, 4000
aime24         HuggingFaceH4/aime_2024          train problem, answer (+ id, year, url)
aime25         yentinglin/aime_2025             train problem, answer (+ id, year, url)
amc23          math-ai/amc23                    test  question, answer (+ id, url)
math500        HuggingFaceH4/MATH-500           test  problem, answer (+ subject, level, unique_id)
minerva        math-ai/minervamath              test  question, answer
omni_math      KbsdJames/Omni-MATH              test  problem, answer, difficulty (+ domain,
                                                      source); difficulty -> tier 1-4
humaneval      openai/openai_humaneval          test  task_id, prompt, test, entry_point
============== ================================ ===== =============================================

How many AIME 1989-2023 rows come out depends on the hub revision (the paper reports 919); the
CLI prints the count.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l2t_verl.assets import write_dataset
from l2t_verl.dataset import DatasetError, validate_dataset
from l2t_verl.scoring.arith import extract_boxed

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
CODE_INSTRUCTION = (
    "Complete the following Python function. Think step by step, then give the complete function "
    "(signature, imports and body) in a single ```python code block."
)

AIME_TRAIN_YEARS = (1989, 2023)
NUMINA_SIZE = 4000
# Omni-MATH rates difficulty on a 1-10 scale.  The L2T paper groups it into four tiers "following"
# Ballon et al. (2025) without listing bounds; we read them as upper-inclusive 3 / 5 / 7 / 10.
OMNI_TIER_UPPER_BOUNDS = (3.0, 5.0, 7.0)

_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SKIPPED_ROWS_SHOWN = 10


class DataPrepError(ValueError):
    """A dataset that cannot be prepared; the message is one line naming the file and the column."""


class SkipRow(Exception):
    """Raised by a converter for a row that cannot be used; the message is the counted reason."""


@dataclass(frozen=True)
class Converted:
    problem: str  # the user message content
    ground_truth: str
    extra: dict[str, Any]


Converter = Callable[[Mapping[str, Any]], "Converted | None"]
"""Row -> :class:`Converted`; ``None`` for a row outside the intended subset; :class:`SkipRow` for a
row that cannot be used."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_id: str
    hub_split: str
    data_source: str
    output_split: str
    columns: tuple[str, ...]  # required
    convert: Converter
    ability: str = "math"
    hub_config: str | None = None
    default_size: int | None = None  # a seeded sample of this many rows unless --size says otherwise


@dataclass
class PrepReport:
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


# ------------------------------------------------------------------------------ value helpers


def _scalar_text(value: Any) -> str | None:
    """A cell as stripped text; ``None`` for missing/empty/NaN.  Integral floats lose their ``.0``
    (CSV and parquet readers turn integer answers with gaps into floats)."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()  # numpy scalars
        except (TypeError, ValueError):
            return None
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip() or None
    return None


def _int_or_none(value: Any) -> int | None:
    text = _scalar_text(value)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _required_text(row: Mapping[str, Any], column: str, what: str = "empty") -> str:
    text = _scalar_text(row.get(column))
    if text is None:
        raise SkipRow(f"{what} {column!r}")
    return text


def _math_prompt(problem: str) -> str:
    return f"{problem} {INSTRUCTION}"


def omni_tier(difficulty: float) -> int:
    """Tier 1-4 of an Omni-MATH difficulty (see :data:`OMNI_TIER_UPPER_BOUNDS`)."""
    for tier, bound in enumerate(OMNI_TIER_UPPER_BOUNDS, start=1):
        if difficulty <= bound:
            return tier
    return len(OMNI_TIER_UPPER_BOUNDS) + 1


# ------------------------------------------------------------------------------ converters


def _qa(problem_col: str, answer_col: str, extra_cols: Mapping[str, str] | None = None) -> Converter:
    """Plain problem/answer datasets; ``extra_cols`` maps extra_info keys to optional columns
    (``year`` and ``level`` are stored as integers, the rest as text)."""
    extra_cols = dict(extra_cols or {})

    def convert(row: Mapping[str, Any]) -> Converted:
        problem = _required_text(row, problem_col)
        answer = _required_text(row, answer_col, "missing")
        extra = {
            key: (_int_or_none if key in ("year", "level") else _scalar_text)(row.get(col))
            for key, col in extra_cols.items()
        }
        return Converted(_math_prompt(problem), answer, extra)

    return convert


def _aime_history(row: Mapping[str, Any]) -> Converted | None:
    year = _int_or_none(row.get("Year"))
    if year is None:
        raise SkipRow("unreadable 'Year'")
    if not AIME_TRAIN_YEARS[0] <= year <= AIME_TRAIN_YEARS[1]:
        return None
    problem = _required_text(row, "Question")
    answer = _required_text(row, "Answer", "missing")
    extra = {
        "year": year,
        "problem_number": _int_or_none(row.get("Problem Number")),
        "part": _scalar_text(row.get("Part")),
        "source_id": _scalar_text(row.get("ID")),
    }
    return Converted(_math_prompt(problem), answer, extra)


def _numina(row: Mapping[str, Any]) -> Converted:
    problem = _required_text(row, "problem")
    solution = _scalar_text(row.get("solution"))
    answer = extract_boxed(solution) if solution else None
    if answer is None or not answer.strip():
        raise SkipRow("no \\boxed{} answer in 'solution'")
    return Converted(_math_prompt(problem), answer.strip(), {"source": _scalar_text(row.get("source"))})


def _omni_math(row: Mapping[str, Any]) -> Converted:
    problem = _required_text(row, "problem")
    answer = _required_text(row, "answer", "missing")
    try:
        difficulty = float(_scalar_text(row.get("difficulty")) or "nan")
    except ValueError:
        difficulty = math.nan
    if not math.isfinite(difficulty):
        raise SkipRow("unreadable 'difficulty'")
    domain = row.get("domain")
    if isinstance(domain, str):
        domain_text = domain.strip() or None
    elif domain is not None and hasattr(domain, "__iter__"):
        domain_text = "; ".join(str(d) for d in domain) or None
    else:
        domain_text = None
    extra = {
        "difficulty": difficulty,
        "tier": omni_tier(difficulty),
        "domain": domain_text,
        "source": _scalar_text(row.get("source")),
    }
    return Converted(_math_prompt(problem), answer, extra)


def _humaneval(row: Mapping[str, Any]) -> Converted:
    # Not _scalar_text: leading indentation and trailing newlines of code are significant.
    prompt, test, entry_point = (row.get(c) for c in ("prompt", "test", "entry_point"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise SkipRow("empty 'prompt'")
    if not isinstance(test, str) or "def check" not in test:
        raise SkipRow("no check() in 'test'")
    entry_point = entry_point.strip() if isinstance(entry_point, str) else ""
    if not _IDENTIFIER_RE.fullmatch(entry_point):
        raise SkipRow("invalid 'entry_point'")
    task_id = _scalar_text(row.get("task_id"))
    truth = json.dumps({"task_id": task_id, "prompt": prompt, "test": test, "entry_point": entry_point})
    content = f"{CODE_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```"
    return Converted(content, truth, {"task_id": task_id, "entry_point": entry_point})


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "aime_1989_2023",
            "di-zhang-fdu/AIME_1983_2024",
            "train",
            "aime_1989_2023",
            "train",
            ("Year", "Question", "Answer"),
            _aime_history,
        ),
        DatasetSpec(
            "numina",
            "AI-MO/NuminaMath-CoT",
            "train",
            "numina_math",
            "train",
            ("problem", "solution"),
            _numina,
            default_size=NUMINA_SIZE,
        ),
        DatasetSpec(
            "aime24",
            "HuggingFaceH4/aime_2024",
            "train",
            "aime2024",
            "test",
            ("problem", "answer"),
            _qa("problem", "answer", {"source_id": "id", "year": "year", "url": "url"}),
        ),
        DatasetSpec(
            "aime25",
            "yentinglin/aime_2025",
            "train",
            "aime2025",
            "test",
            ("problem", "answer"),
            _qa("problem", "answer", {"source_id": "id", "year": "year", "url": "url"}),
        ),
        DatasetSpec(
            "amc23",
            "math-ai/amc23",
            "test",
            "amc2023",
            "test",
            ("question", "answer"),
            _qa("question", "answer", {"source_id": "id", "url": "url"}),
        ),
        DatasetSpec(
            "math500",
            "HuggingFaceH4/MATH-500",
            "test",
            "math500",
            "test",
            ("problem", "answer"),
            _qa("problem", "answer", {"subject": "subject", "level": "level", "unique_id": "unique_id"}),
        ),
        DatasetSpec(
            "minerva",
            "math-ai/minervamath",
            "test",
            "minerva_math",
            "test",
            ("question", "answer"),
            _qa("question", "answer"),
        ),
        DatasetSpec(
            "omni_math",
            "KbsdJames/Omni-MATH",
            "test",
            "omni_math",
            "test",
            ("problem", "answer", "difficulty"),
            _omni_math,
        ),
        DatasetSpec(
            "humaneval",
            "openai/openai_humaneval",
            "test",
            "humaneval",
            "test",
            ("task_id", "prompt", "test", "entry_point"),
            _humaneval,
            ability="code",
        ),
    )
}


# ------------------------------------------------------------------------------ reading


def read_local(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local ``.json`` (a list of objects, or JSON lines as ``Dataset.to_json`` writes
    them), ``.jsonl``, ``.parquet`` or ``.csv`` file (CSV cells are read as text)."""
    path = Path(path)
    if not path.is_file():
        raise DataPrepError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None  # not one document: JSON lines under a .json name
            if data is not None:
                if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                    raise DataPrepError(f"{path}: expected a JSON list of objects (or JSON lines)")
                return data
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
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
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DataPrepError(f"{path}: not a readable parquet file ({exc})") from None
    if suffix == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as exc:  # pandas' parser errors have no common base
            raise DataPrepError(f"{path}: not a readable CSV file ({exc})") from None
        return frame.to_dict(orient="records")
    raise DataPrepError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl, .parquet or .csv)")


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
    parser.add_argument("--input", default=None, help="local .json/.jsonl/.parquet/.csv instead of the hub")
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
