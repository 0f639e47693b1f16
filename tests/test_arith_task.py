"""Tests for l2t_verl.arith_task: problem generation, parsing, worked solutions and parquet writing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from l2t_verl import arith_task


def test_worked_solution_format() -> None:
    text = arith_task.worked_solution("Start at 7. Add 5. Multiply by 3. Subtract 4. What is the result?")
    assert text == "<think>\n7 + 5 = 12\n\n12 * 3 = 36\n\n36 - 4 = 32\n</think>\nThe answer is \\boxed{32}."
    assert arith_task.worked_solution("Start at 12. Divide by 4.").endswith("\\boxed{3}.")


def test_solution_steps_match_worked_solution() -> None:
    start, equations, values = arith_task.solution_steps("Start at 7. Add 5. Multiply by 3.")
    assert (start, equations, values) == (7, ["7 + 5 = 12", "12 * 3 = 36"], [12, 36])
    for row in arith_task.make_problems(50, seed=2):
        start, equations, values = arith_task.solution_steps(row)
        assert values[-1] == arith_task.solve(row)
        assert arith_task.STEP_SEPARATOR.join(equations) in arith_task.worked_solution(row)


def test_problem_text_accepts_strings_messages_and_rows() -> None:
    row = arith_task.make_problems(1, seed=0)[0]
    text = row["prompt"][0]["content"]
    assert arith_task.problem_text(text) == text
    assert arith_task.problem_text(row["prompt"]) == text
    assert arith_task.problem_text(row) == text
    assert arith_task.problem_text({"content": text}) == text
    with pytest.raises(ValueError, match="no user message"):
        arith_task.problem_text([{"role": "system", "content": text}])
    with pytest.raises(ValueError, match="not an arithmetic problem"):
        arith_task.parse_problem("What is 1 + 1?")


def test_problem_invariants() -> None:
    rows = arith_task.make_problems(400, seed=5, min_steps=2, max_steps=4)
    assert len({r["prompt"][0]["content"] for r in rows}) == 400
    assert {r["extra_info"]["num_steps"] for r in rows} == {2, 3, 4}
    for r in rows:
        start, ops = arith_task.parse_problem(r)
        assert len(ops) == r["extra_info"]["num_steps"]
        assert arith_task.render_prompt(start, ops) == r["prompt"][0]["content"]
        value = start
        for op, k in ops:
            value = arith_task.apply_op(op, value, k)
            assert 0 <= value <= arith_task.MAX_VALUE + arith_task.MAX_ADDEND
        assert str(value) == r["reward_model"]["ground_truth"]
    tiers = {arith_task.difficulty_tier(n) for n in range(1, 7)}
    assert tiers == {1, 2, 3, 4}


def test_make_problems_impossible_request_fails_fast() -> None:
    with pytest.raises(RuntimeError, match="distinct problems"):
        arith_task.make_problems(100_000, seed=0, min_steps=1, max_steps=1)
    with pytest.raises(ValueError):
        arith_task.make_problems(1, seed=0, min_steps=3, max_steps=2)


def test_problems_deterministic() -> None:
    make = arith_task.make_problems
    assert make(50, seed=7) == make(50, seed=7)
    assert make(50, seed=7) != make(50, seed=8)
    assert make(50, seed=7, split="train") != make(50, seed=7, split="test")


def test_write_dataset_keeps_foreign_extra_info(tmp_path: Path) -> None:
    row = arith_task.make_problems(1, seed=0)[0]
    row["extra_info"] = {**row["extra_info"], "level": "Level 5"}
    df = pd.read_parquet(arith_task.write_dataset([row], tmp_path / "x.parquet"))
    assert df["extra_info"][0]["level"] == "Level 5"


def test_importing_the_task_does_not_load_torch() -> None:
    import subprocess
    import sys

    code = "import sys, l2t_verl.arith_task; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
