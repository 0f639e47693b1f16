"""The synthetic multi-step arithmetic task of the offline assets, as verl parquet rows.

A problem is a start value and a few operations (``"Start at 7. Add 5. Multiply by 3. ..."``);
its worked solution writes one equation per step, steps separated by a blank line, inside a
``<think>`` block, then a ``\\boxed{}`` answer.  Every intermediate is a non-negative integer of
modest size, so a tiny model can learn the task on a CPU.

Rows carry verl's columns with ``data_source = "l2t_arith"`` (scored by
:mod:`l2t_verl.scoring.arith`).  Everything here is pure Python; pyarrow is imported only when a
dataset is written, never torch.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "ABILITY",
    "DATA_SOURCE",
    "INSTRUCTION",
    "MAX_ADDEND",
    "MAX_FACTOR",
    "MAX_START",
    "MAX_VALUE",
    "OP_SYMBOL",
    "STEP_SEPARATOR",
    "THINK_END",
    "THINK_START",
    "apply_op",
    "arith_schema",
    "difficulty_tier",
    "make_problems",
    "parse_problem",
    "problem_text",
    "render_prompt",
    "solution_steps",
    "solve",
    "worked_solution",
    "write_dataset",
]

DATA_SOURCE = "l2t_arith"
ABILITY = "math"
INSTRUCTION = "What is the result? Think step by step and put the final answer in \\boxed{}."

THINK_START = "<think>"
THINK_END = "</think>"
STEP_SEPARATOR = "\n\n"

MAX_START = 20
MAX_ADDEND = 20
MAX_FACTOR = 5
# Soft cap on intermediate values: multiplication is only offered while the product stays
# below it, so numbers remain "small" (at most MAX_VALUE + MAX_ADDEND).
MAX_VALUE = 500

OP_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_OP_TEXT = {"add": "Add {k}.", "sub": "Subtract {k}.", "mul": "Multiply by {k}.", "div": "Divide by {k}."}
_TEXT_OP = {"Add": "add", "Subtract": "sub", "Multiply by": "mul", "Divide by": "div"}
_START_RE = re.compile(r"Start at (\d+)\.")
_OP_RE = re.compile(r"(Add|Subtract|Multiply by|Divide by) (\d+)\.")


def apply_op(op: str, value: int, k: int) -> int:
    """``value`` after one operation (``"add"``, ``"sub"``, ``"mul"`` or ``"div"``, the latter exact)."""
    if op == "add":
        return value + k
    if op == "sub":
        return value - k
    if op == "mul":
        return value * k
    if op == "div":
        return value // k
    raise ValueError(f"unknown op {op!r}")


def _random_op(rng: random.Random, value: int) -> tuple[str, int]:
    # Only offer operations that keep every intermediate a non-negative integer of modest size:
    # subtraction never goes below zero and division is always exact.
    choices = ["add"]
    if value >= 1:
        choices.append("sub")
    if 1 <= value and value * 2 <= MAX_VALUE:
        choices.append("mul")
    divisors = [k for k in range(2, MAX_FACTOR + 1) if value >= k and value % k == 0]
    if divisors:
        choices.append("div")
    op = rng.choice(choices)
    if op == "add":
        k = rng.randint(1, MAX_ADDEND)
    elif op == "sub":
        k = rng.randint(1, min(value, MAX_ADDEND))
    elif op == "mul":
        k = rng.randint(2, min(MAX_FACTOR, MAX_VALUE // value))
    else:
        k = rng.choice(divisors)
    return op, k


def difficulty_tier(num_steps: int) -> int:
    """Difficulty tier 1..4 from the number of operations: 1 -> 1, 2-3 -> 2, 4-5 -> 3, 6+ -> 4."""
    return max(1, min(4, 1 + num_steps // 2))


def render_prompt(start: int, ops: Sequence[tuple[str, int]]) -> str:
    """The user message of a problem: ``"Start at 7. Add 5. ... <INSTRUCTION>"``."""
    parts = [f"Start at {start}."] + [_OP_TEXT[op].format(k=k) for op, k in ops] + [INSTRUCTION]
    return " ".join(parts)


def problem_text(problem: Any) -> str:
    """The user message of a problem given as a raw prompt string, a message list, or a verl row
    (also as read back by pandas, where ``prompt`` is a numpy array of dicts)."""
    if isinstance(problem, str):
        return problem
    if isinstance(problem, dict):
        if "prompt" in problem:
            return problem_text(problem["prompt"])
        if "content" in problem:
            return str(problem["content"])
        raise ValueError("problem dict has neither 'prompt' nor 'content'")
    messages = list(problem)
    user = [m for m in messages if m.get("role") == "user"]
    if not user:
        raise ValueError("problem has no user message")
    return str(user[-1]["content"])


def parse_problem(problem: Any) -> tuple[int, list[tuple[str, int]]]:
    """Recover ``(start, [(op, k), ...])`` from a problem (anything :func:`problem_text` accepts).

    Parsing the text rather than carrying hidden fields means rows read back from parquet work
    exactly like freshly generated ones.
    """
    text = problem_text(problem)
    m = _START_RE.search(text)
    if m is None:
        raise ValueError(f"not an arithmetic problem: {text!r}")
    ops = [(_TEXT_OP[op_m.group(1)], int(op_m.group(2))) for op_m in _OP_RE.finditer(text, m.end())]
    return int(m.group(1)), ops


def solve(problem: Any) -> int:
    """The exact answer of a problem."""
    value, ops = parse_problem(problem)
    for op, k in ops:
        value = apply_op(op, value, k)
    return value


def solution_steps(problem: Any) -> tuple[int, list[str], list[int]]:
    """``(start, step equations, value after each step)``, e.g. ``(7, ["7 + 5 = 12"], [12])``."""
    value, ops = parse_problem(problem)
    start, equations, values = value, [], []
    for op, k in ops:
        new = apply_op(op, value, k)
        equations.append(f"{value} {OP_SYMBOL[op]} {k} = {new}")
        values.append(new)
        value = new
    return start, equations, values


def worked_solution(problem: Any) -> str:
    """Reference reasoning trace: one equation per step, steps separated by a blank line, e.g.
    ``"<think>\\n7 + 5 = 12\\n\\n12 * 3 = 36\\n</think>\\nThe answer is \\\\boxed{36}."``."""
    start, equations, values = solution_steps(problem)
    answer = values[-1] if values else start
    body = STEP_SEPARATOR.join(equations)
    return f"{THINK_START}\n{body}\n{THINK_END}\nThe answer is \\boxed{{{answer}}}."


def make_problems(
    n: int,
    seed: int,
    min_steps: int = 1,
    max_steps: int = 6,
    *,
    split: str = "train",
    exclude: Iterable[str] = (),
) -> list[dict]:
    """Generate ``n`` distinct problems as verl rows.

    The RNG is keyed on ``(seed, split)`` so train and test draw different streams; prompts in
    ``exclude`` (e.g. the train prompts when making the test split) are never emitted.
    The number of steps is uniform on ``[min_steps, max_steps]``.
    """
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    # A str seed is hashed with SHA-512 by ``random``, so it is stable across processes
    # (unlike ``hash()``, which is salted per process).
    rng = random.Random(f"{DATA_SOURCE}:{split}:{seed}")
    seen = set(exclude)
    rows: list[dict] = []
    # Give up after this many duplicates in a row: the requested step range has (nearly) run out
    # of distinct problems, e.g. thousands of 1-step problems.
    patience, misses = 10_000, 0
    while len(rows) < n:
        if misses >= patience:
            raise RuntimeError(
                f"could only find {len(rows)} distinct problems out of {n} "
                f"(steps {min_steps}..{max_steps}); ask for fewer or allow more steps"
            )
        num_steps = rng.randint(min_steps, max_steps)
        start = rng.randint(0, MAX_START)
        value, ops = start, []
        for _ in range(num_steps):
            op, k = _random_op(rng, value)
            ops.append((op, k))
            value = apply_op(op, value, k)
        text = render_prompt(start, ops)
        if text in seen:
            misses += 1
            continue
        misses = 0
        seen.add(text)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": text}],
                "ability": ABILITY,
                "reward_model": {"style": "rule", "ground_truth": str(value)},
                "extra_info": {
                    "split": split,
                    "index": len(rows),
                    "num_steps": num_steps,
                    "tier": difficulty_tier(num_steps),
                },
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------


def arith_schema() -> pa.Schema:
    """Explicit parquet schema, so column types never depend on inference from sample rows."""
    import pyarrow as pa

    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("split", pa.string()),
                        ("index", pa.int64()),
                        ("num_steps", pa.int64()),
                        ("tier", pa.int64()),
                    ]
                ),
            ),
        ]
    )


_ARITH_COLUMNS = frozenset({"data_source", "prompt", "ability", "reward_model", "extra_info"})
_ARITH_EXTRA_INFO = frozenset({"split", "index", "num_steps", "tier"})


def _has_arith_layout(row: dict) -> bool:
    # Exact key match only: pyarrow silently drops struct keys missing from an explicit schema,
    # so e.g. a math row with an extra_info["level"] must fall back to inference.
    return set(row) == _ARITH_COLUMNS and set(row.get("extra_info") or ()) == _ARITH_EXTRA_INFO


def write_dataset(rows: Sequence[dict], path: str | Path, schema: pa.Schema | None = None) -> Path:
    """Write verl rows (of this task or any other) to parquet.  ``schema`` defaults to
    :func:`arith_schema` when every row has exactly its columns and ``extra_info`` keys, otherwise
    it is inferred by pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is None and rows and all(_has_arith_layout(r) for r in rows):
        schema = arith_schema()
    table = pa.Table.from_pylist(list(rows), schema=schema)
    pq.write_table(table, path)
    return path
