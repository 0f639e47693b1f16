"""Data preparation into verl parquet: every fixture (hub column layout, with malformed rows) becomes
a valid file with the right content, bad rows are counted, and bad files fail in one line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from l2t_verl import data_prep
from l2t_verl.data_prep import DataPrepError, prepare
from l2t_verl.data_sources import INSTRUCTION, omni_tier
from l2t_verl.dataset import validate_dataset
from l2t_verl.scoring import compute_score

FIXTURES = Path(__file__).parent / "fixtures" / "data"
REPO = Path(__file__).resolve().parents[1]

# dataset -> (fixture, output split, rows written, filtered, skipped reasons)
CASES = {
    "aime_1989_2023": (
        "aime_1983_2024.csv",
        "train",
        4,
        2,
        {"empty 'Question'": 1, "missing 'Answer'": 1, "unreadable 'Year'": 1},
    ),
    "numina": (
        "numina_cot.jsonl",
        "train",
        7,
        0,
        {"empty 'problem'": 1, "no \\boxed{} answer in 'solution'": 1},
    ),
    "aime24": ("aime_2024.jsonl", "test", 3, 0, {"missing 'answer'": 1}),
    "aime25": ("aime_2025.jsonl", "test", 2, 0, {"empty 'problem'": 1}),
    "amc23": ("amc23.jsonl", "test", 3, 0, {"missing 'answer'": 1}),
    "math500": ("math500.jsonl", "test", 2, 0, {"missing 'answer'": 1}),
    "minerva": ("minervamath.jsonl", "test", 2, 0, {"missing 'answer'": 1}),
    "omni_math": ("omni_math.jsonl", "test", 8, 0, {"unreadable 'difficulty'": 1, "missing 'answer'": 1}),
    "humaneval": ("humaneval.jsonl", "test", 3, 0, {"no check() in 'test'": 1, "invalid 'entry_point'": 1}),
}


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def by_source_id(rows: list[dict], key: str = "source_id") -> dict:
    return {r["extra_info"][key]: r for r in rows}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[data_prep.PrepReport, list[dict]]]:
    """Every fixture prepared once (the NuminaMath sample at its full fixture size)."""
    out = {}
    for name, (fixture, *_rest) in CASES.items():
        size = 100 if name == "numina" else None  # more than the fixture has: take every usable row
        report = prepare(name, tmp_path_factory.mktemp(name), FIXTURES / fixture, size=size)
        out[name] = (report, rows_of(report.path))
    return out


def test_registry_covers_the_papers_datasets() -> None:
    assert set(data_prep.DATASETS) == set(CASES)
    for spec in data_prep.DATASETS.values():
        assert "/" in spec.hub_id and spec.hub_split in ("train", "test")


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_becomes_valid_verl_parquet(name: str, prepared: dict) -> None:
    fixture, split, n_rows, filtered, skipped = CASES[name]
    report, rows = prepared[name]
    spec = data_prep.DATASETS[name]
    assert report.path.name == f"{split}.parquet"
    assert validate_dataset(report.path) == n_rows == len(rows) == report.rows_written
    assert report.filtered == filtered
    assert dict(report.skipped) == skipped
    assert len(report.skipped_rows) == sum(skipped.values())
    for i, row in enumerate(rows):
        assert row["data_source"] == spec.data_source
        assert row["ability"] == spec.ability
        assert row["reward_model"]["style"] == "rule"
        assert row["reward_model"]["ground_truth"].strip()
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert row["extra_info"]["split"] == split
        assert row["extra_info"]["index"] == i
        if spec.ability == "math":
            assert row["prompt"][0]["content"].endswith(" " + INSTRUCTION)
    # The summary the CLI prints counts every skipped row and names them.
    summary = report.summary()
    assert f"wrote {n_rows}" in summary
    if skipped:
        assert f"skipped {sum(skipped.values())}" in summary


@pytest.mark.parametrize("name", sorted(set(CASES) - {"humaneval"}))
def test_math_ground_truths_are_accepted_by_their_verifier(name: str, prepared: dict) -> None:
    _report, rows = prepared[name]
    row = rows[0]
    truth = row["reward_model"]["ground_truth"]
    assert compute_score(row["data_source"], f"So the answer is \\boxed{{{truth}}}.", truth) == 1.0
    assert compute_score(row["data_source"], "So the answer is \\boxed{123456789}.", truth) == 0.0


def test_aime_history_keeps_1989_to_2023(prepared: dict) -> None:
    _report, rows = prepared["aime_1989_2023"]
    years = sorted(r["extra_info"]["year"] for r in rows)
    assert years == [1989, 1995, 2005, 2023]  # 1983 and 2024 filtered, three bad rows skipped
    rows = by_source_id(rows)
    assert {k: r["reward_model"]["ground_truth"] for k, r in rows.items()} == {
        "1989-3": "24",
        "1995-7": "11",
        "2005-I-2": "100",
        "2023-II-15": "45",
    }
    assert rows["2023-II-15"]["extra_info"]["problem_number"] == 15
    assert rows["2023-II-15"]["extra_info"]["part"] == "II"
    assert rows["1989-3"]["prompt"][0]["content"].startswith("Compute the remainder when $2^{10}$")


def test_numina_answer_is_last_boxed(prepared: dict) -> None:
    _report, rows = prepared["numina"]
    truths = {r["extra_info"]["source_index"]: r["reward_model"]["ground_truth"] for r in rows}
    assert truths[0] == "5"
    assert truths[1] == "\\frac{5}{6}"
    assert truths[3] == "84"  # not the earlier, wrong \boxed{80}
    assert truths[8] == "A"
    assert 2 not in truths and 5 not in truths  # no boxed answer; empty problem


def test_numina_sampling_is_seeded_and_reproducible(tmp_path: Path) -> None:
    fixture = FIXTURES / "numina_cot.jsonl"

    def sample(seed: int, directory: str) -> list[int]:
        report = prepare("numina", tmp_path / directory, fixture, size=4, seed=seed)
        rows = rows_of(report.path)
        assert len(rows) == 4 == report.rows_written
        return [r["extra_info"]["source_index"] for r in rows]

    first, again = sample(0, "a"), sample(0, "b")
    assert first == again
    assert (tmp_path / "a" / "train.parquet").read_bytes() == (tmp_path / "b" / "train.parquet").read_bytes()
    assert len(set(first)) == 4  # without replacement
    assert not {2, 5} & set(first)  # unusable rows are never sampled
    assert any(sample(seed, f"s{seed}") != first for seed in (1, 2, 3))
    # The CLI default is the paper's sample size.
    assert data_prep.DATASETS["numina"].default_size == 4000


def test_omni_math_tiers(prepared: dict) -> None:
    _report, rows = prepared["omni_math"]
    got = sorted((r["extra_info"]["difficulty"], r["extra_info"]["tier"]) for r in rows)
    assert got == [(1.0, 1), (2.5, 1), (3.0, 1), (3.5, 2), (5.0, 2), (6.5, 3), (7.5, 4), (9.0, 4)]
    assert all(r["extra_info"]["domain"].startswith("Mathematics") for r in rows)


@pytest.mark.parametrize(
    ("difficulty", "tier"), [(0.5, 1), (3.0, 1), (3.01, 2), (5.0, 2), (7.0, 3), (7.5, 4), (10, 4)]
)
def test_omni_tier_bounds(difficulty: float, tier: int) -> None:
    assert omni_tier(difficulty) == tier


def test_amc_float_answers_lose_trailing_zero(prepared: dict) -> None:
    _report, rows = prepared["amc23"]
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["15", "0.25", "12"]


def test_math500_keeps_level_and_subject(prepared: dict) -> None:
    _report, rows = prepared["math500"]
    rows = by_source_id(rows, "unique_id")
    row = rows["test/precalculus/1.json"]
    assert row["extra_info"]["level"] == 2 and row["extra_info"]["subject"] == "Precalculus"
    assert row["reward_model"]["ground_truth"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_humaneval_ground_truth_drives_the_code_verifier(prepared: dict) -> None:
    _report, rows = prepared["humaneval"]
    fixture = {
        r["task_id"]: r for r in map(json.loads, (FIXTURES / "humaneval.jsonl").read_text().splitlines())
    }
    assert [r["extra_info"]["task_id"] for r in rows] == ["Toy/0", "Toy/1", "Toy/2"]
    for row in rows:
        truth = json.loads(row["reward_model"]["ground_truth"])
        task = fixture[truth["task_id"]]
        assert truth == {k: task[k] for k in ("task_id", "prompt", "test", "entry_point")}
        assert task["prompt"].rstrip() in row["prompt"][0]["content"]
        # The hub's canonical body completes the prompt and passes; a wrong body does not.
        gt = row["reward_model"]["ground_truth"]
        assert compute_score("humaneval", task["canonical_solution"], gt) == 1.0
        assert compute_score("humaneval", "    return None\n", gt) == 0.0


# ----------------------------------------------------------------------------- input formats


def test_parquet_and_json_array_inputs(tmp_path: Path) -> None:
    records = [json.loads(line) for line in (FIXTURES / "math500.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "math500.parquet")
    (tmp_path / "math500.json").write_text(json.dumps(records))
    expected = rows_of(prepare("math500", tmp_path / "from_jsonl", FIXTURES / "math500.jsonl").path)
    for name in ("math500.parquet", "math500.json"):
        got = rows_of(prepare("math500", tmp_path / name.replace(".", "_"), tmp_path / name).path)
        assert got == expected


def test_gzipped_humaneval_jsonl_like_the_official_file(tmp_path: Path) -> None:
    # The official file is HumanEval.jsonl.gz; the fixture gzipped gives the same rows as the plain one.
    gz = tmp_path / "HumanEval.jsonl.gz"
    gz.write_bytes(gzip.compress((FIXTURES / "humaneval.jsonl").read_bytes(), mtime=0))
    expected = rows_of(prepare("humaneval", tmp_path / "plain", FIXTURES / "humaneval.jsonl").path)
    report = prepare("humaneval", tmp_path / "gz", gz)
    assert rows_of(report.path) == expected
    assert report.source == str(gz) and dict(report.skipped) == CASES["humaneval"][4]
    # And through the CLI's entry point.
    assert data_prep.main(["humaneval", "--output", str(tmp_path / "cli"), "--input", str(gz)]) == 0
    assert rows_of(tmp_path / "cli" / "test.parquet") == expected


def test_gzipped_json_array_and_csv_inputs(tmp_path: Path) -> None:
    records = [json.loads(line) for line in (FIXTURES / "math500.jsonl").read_text().splitlines()]
    (tmp_path / "math500.JSON.GZ").write_bytes(gzip.compress(json.dumps(records).encode()))
    expected = rows_of(prepare("math500", tmp_path / "from_jsonl", FIXTURES / "math500.jsonl").path)
    assert rows_of(prepare("math500", tmp_path / "from_gz", tmp_path / "math500.JSON.GZ").path) == expected

    csv_gz = tmp_path / "aime.csv.gz"
    csv_gz.write_bytes(gzip.compress((FIXTURES / "aime_1983_2024.csv").read_bytes()))
    expected = rows_of(prepare("aime_1989_2023", tmp_path / "csv", FIXTURES / "aime_1983_2024.csv").path)
    assert rows_of(prepare("aime_1989_2023", tmp_path / "csv_gz", csv_gz).path) == expected


def test_json_lines_keep_unicode_line_separators_and_ignore_a_bom(tmp_path: Path) -> None:
    # U+2028 / U+0085 are legal inside JSON strings; only "\n" ends a JSON line.
    question = "Line one\u2028line two\x85 three: what is 1 + 1?"
    path = tmp_path / "minerva.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + (json.dumps({"question": question, "answer": "2"}, ensure_ascii=False) + "\n").encode()
    )
    rows = rows_of(prepare("minerva", tmp_path / "out", path).path)
    assert rows[0]["prompt"][0]["content"] == f"{question} {INSTRUCTION}"


# ----------------------------------------------------------------------------- errors


def assert_one_line_naming(exc: BaseException, *parts: str) -> None:
    message = str(exc)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_missing_column_is_one_line_naming_file_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "no_answer.jsonl"
    bad.write_text(json.dumps({"problem": "What is 1 + 1?", "solution": "2"}) + "\n")
    with pytest.raises(DataPrepError) as info:
        prepare("math500", tmp_path / "out", bad)
    assert_one_line_naming(info.value, str(bad), "'answer'")
    assert not (tmp_path / "out" / "test.parquet").exists()

    csv = tmp_path / "aime.csv"
    pd.DataFrame({"Year": [1990], "Question": ["Q"]}).to_csv(csv, index=False)
    with pytest.raises(DataPrepError) as info:
        prepare("aime_1989_2023", tmp_path / "out", csv)
    assert_one_line_naming(info.value, str(csv), "'Answer'")


def test_nothing_left_is_an_error(tmp_path: Path) -> None:
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(
        json.dumps({"question": "", "answer": "1"})
        + "\n"
        + json.dumps({"question": "Q", "answer": None})
        + "\n"
    )
    with pytest.raises(DataPrepError) as info:
        prepare("minerva", tmp_path / "out", only_bad)
    assert_one_line_naming(
        info.value, str(only_bad), "no usable rows", "1 empty 'question'", "1 missing 'answer'"
    )

    out_of_range = tmp_path / "old.csv"
    pd.DataFrame({"Year": [1983, 2024], "Question": ["Q", "Q"], "Answer": [1, 2]}).to_csv(
        out_of_range, index=False
    )
    with pytest.raises(DataPrepError, match="filtered 2"):
        prepare("aime_1989_2023", tmp_path / "out", out_of_range)


@pytest.mark.parametrize(
    ("filename", "content", "parts"),
    [
        ("broken.jsonl", '{"question": "Q", "answer": "1"}\n{not json\n', ["line 2", "invalid JSON"]),
        ("list.jsonl", '["question", "answer"]\n', ["line 1", "JSON object"]),
        ("table.json", '{"question": ["Q"], "answer": ["1"]}', ["list of objects"]),
        ("table.xlsx", "not really a spreadsheet", ["unsupported file type '.xlsx'"]),
        ("empty.jsonl", "\n", ["no rows"]),
        ("bad.parquet", "not parquet", ["not a readable parquet file"]),
    ],
)
def test_unreadable_inputs_fail_in_one_line(
    tmp_path: Path, filename: str, content: str, parts: list[str]
) -> None:
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(DataPrepError) as info:
        prepare("minerva", tmp_path / "out", path)
    assert_one_line_naming(info.value, str(path), *parts)


def _truncated_gzip() -> bytes:
    return gzip.compress(b'{"question": "Q", "answer": "1"}\n' * 50)[:-12]


@pytest.mark.parametrize(
    ("filename", "content", "parts"),
    [
        ("plain.jsonl.gz", b'{"question": "Q", "answer": "1"}\n', ["not a readable gzip file"]),
        ("cut.jsonl.gz", _truncated_gzip(), ["not a readable gzip file"]),
        (
            "broken.jsonl.gz",
            gzip.compress(b'{"question": "Q", "answer": "1"}\n{not json\n'),
            ["line 2", "invalid JSON"],
        ),
        ("table.json.gz", gzip.compress(b'{"question": ["Q"]}'), ["list of objects"]),
        (
            "latin1.jsonl.gz",
            gzip.compress(b'{"question": "Q", "answer": "1"}\n{"question": "caf\xe9"}\n'),
            ["line 2", "not UTF-8"],
        ),
        (
            "latin1.jsonl",
            b'{"question": "Q", "answer": "1"}\n{"question": "caf\xe9"}\n',
            ["line 2", "not UTF-8"],
        ),
        ("rows.parquet.gz", gzip.compress(b"PAR1"), ["unsupported file type '.parquet.gz'"]),
        ("rows.gz", gzip.compress(b"{}"), ["unsupported file type '.gz'"]),
        ("empty.jsonl.gz", gzip.compress(b"\n"), ["no rows"]),
    ],
)
def test_bad_gzipped_inputs_fail_in_one_line(
    tmp_path: Path, filename: str, content: bytes, parts: list[str]
) -> None:
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(DataPrepError) as info:
        prepare("minerva", tmp_path / "out", path)
    assert_one_line_naming(info.value, str(path), *parts)


def test_missing_file_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataPrepError) as info:
        prepare("minerva", tmp_path, tmp_path / "nope.jsonl")
    assert_one_line_naming(info.value, str(tmp_path / "nope.jsonl"), "file not found")
    with pytest.raises(DataPrepError, match="unknown dataset 'gsm8k'"):
        prepare("gsm8k", tmp_path)


def test_hub_failure_is_one_line_pointing_at_input(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets

    calls = []

    def unreachable(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        raise ConnectionError("Couldn't reach 'x' on the Hub\n(more detail on a second line)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataPrepError) as info:
        prepare("omni_math", tmp_path)
    assert calls == [("KbsdJames/Omni-MATH", None, "test")]
    assert_one_line_naming(info.value, "KbsdJames/Omni-MATH", "ConnectionError", "--input")


# ----------------------------------------------------------------------------- the script


def test_script_runs_one_dataset(tmp_path: Path) -> None:
    script = REPO / "scripts" / "data" / "prepare.py"
    ok = subprocess.run(
        [
            sys.executable,
            str(script),
            "aime24",
            "--output",
            str(tmp_path),
            "--input",
            str(FIXTURES / "aime_2024.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote 3" in ok.stdout and "skipped 1 (1 missing 'answer'; rows 3)" in ok.stdout
    assert validate_dataset(tmp_path / "test.parquet") == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "Q"}) + "\n")
    failed = subprocess.run(
        [sys.executable, str(script), "aime24", "--output", str(tmp_path / "x"), "--input", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0] and "'answer'" in lines[0]
    )
