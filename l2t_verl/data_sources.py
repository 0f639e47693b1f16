"""The paper's public datasets: where each one lives on the Hugging Face hub, the columns it needs and
how one of its rows becomes the prompt, ground truth and ``extra_info`` of a verl row.

:data:`DATASETS` maps a name (what ``scripts/data/prepare.py NAME`` takes) to a :class:`DatasetSpec`;
:func:`l2t_verl.data_prep.prepare` reads the rows, runs the spec's converter on each and writes the
parquet file.  A converter returns a :class:`Converted`, ``None`` for a row outside the dataset's
intended subset (AIME years outside 1989-2023), or raises :class:`SkipRow` with the counted reason
for a row that cannot be used (empty problem, no answer, unreadable year or difficulty).

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

How many AIME 1989-2023 rows come out depends on the hub revision (the paper reports 919).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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


class SkipRow(Exception):
    """Raised by a converter for a row that cannot be used; the message is the counted reason."""


@dataclass(frozen=True)
class Converted:
    """What a converter makes of one usable row."""

    problem: str  # the user message content
    ground_truth: str
    extra: dict[str, Any]


Converter = Callable[[Mapping[str, Any]], "Converted | None"]
"""Row -> :class:`Converted`; ``None`` for a row outside the intended subset; :class:`SkipRow` for a
row that cannot be used."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where it lives on the hub, what it becomes and how its rows are converted."""

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
