"""Evaluation library and CLIs (l2t_verl.evaluation, scripts/eval) on the tiny offline model.

The end-to-end run uses the real ``hf`` backend on a briefly warm-started model. That model rarely
gets the arithmetic right, so next to the arith rows the run also evaluates the same prompts under a
test verifier (an even boxed integer scores 1), which gives a deterministic mix of 0 and 1 scores
for the pass@1 / maj@4 recomputations. Depth and budget protocol checks use a scripted backend whose
forced answers depend only on the reasoning they see, so Acc(k) can be worked out by hand.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from l2t_verl.episodes import EpisodeConfig, segment_episodes
from l2t_verl.evaluation import (
    AnalysisConfig,
    EvaluationError,
    ForceConfig,
    Generation,
    GenerationBackend,
    SamplingConfig,
    compare,
    evaluate,
    load_result,
    maj_at_k,
    majority_score,
    make_backend,
    resolve_model,
)
from l2t_verl.evaluation.forcing import cut_forced_answer, reasoning_end
from l2t_verl.evaluation.metrics import budget_cut
from l2t_verl.scoring import compute_score, extract_boxed, register_verifier
from l2t_verl.scoring.arith import parse_int

ROOT = Path(__file__).resolve().parents[1]
ARITH_FORCE = "\n</think>\nThe answer is \\boxed{"
ARITH_ANSWER = "}."
ARITH = ForceConfig(ARITH_FORCE, ARITH_ANSWER)
PARITY_SOURCE = "l2t_evaltest_parity"


@register_verifier(PARITY_SOURCE)
def _parity_score(solution_str: str, ground_truth, extra_info=None, **kwargs) -> float:
    value = parse_int(extract_boxed(solution_str))
    return 1.0 if value is not None and value % 2 == 0 else 0.0


def _row(content: str, truth: str = "5", tier: int | None = 1, source: str = "l2t_arith") -> dict:
    row = {
        "data_source": source,
        "prompt": [{"role": "user", "content": content}],
        "reward_model": {"style": "rule", "ground_truth": truth},
    }
    if tier is not None:
        row["extra_info"] = {"tier": tier}
    return row


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from l2t_verl.assets import build_all

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is several times faster than two busy ones
    try:
        return build_all(tmp_path_factory.mktemp("assets"), seed=0, train_size=8, val_size=8, sft_steps=150)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def e2e(assets, tmp_path_factory):
    """One real hf-backend evaluation on two datasets, report written to disk."""
    import pyarrow.parquet as pq

    tmp = tmp_path_factory.mktemp("e2e")
    rows = pq.read_table(assets["test"]).to_pylist()[:4]
    parity = _write_jsonl(tmp / "parity.jsonl", [{**r, "data_source": PARITY_SOURCE} for r in rows])
    out = tmp / "run"
    result = evaluate(
        assets["model"],
        [assets["test"], parity],
        backend="hf",
        sampling=SamplingConfig(n=4, temperature=0.8, top_p=1.0, max_tokens=48, seed=3),
        analysis=AnalysisConfig(budgets=[8, 24], depth=True, depth_samples=2, force=ARITH),
        limit=4,
        backend_options={"num_threads": 1},
        name="e2e",
        output_dir=out,
    )
    return result, out


class ScriptedBackend(GenerationBackend):
    """Sampling returns fixed responses per prompt; a forced answer is "5" iff the reasoning it is
    forced after contains "step two", else "7". Every greedy probe is recorded."""

    name = "scripted"

    def __init__(self, tokenizer, responses: dict[str, list[str]]) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = 4096
        self.responses = responses
        self.probes: list[list[int]] = []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]

    def generate(self, prompts, sampling: SamplingConfig, desc: str = "") -> list[list[Generation]]:
        out = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt)
            if sampling.temperature > 0:
                (key,) = [k for k in self.responses if k in text]
                assert len(self.responses[key]) == sampling.n
                out.append([Generation(self._ids(r), "stop") for r in self.responses[key]])
            else:
                self.probes.append(list(prompt))
                reasoning = text.split("assistant\n", 1)[1]
                out.append([Generation(self._ids("5}." if "step two" in reasoning else "7}."), "stop")])
        return out


A = "<think>\nstep one\n\nstep two\n\nstep three\n</think>\nThe answer is \\boxed{5}."  # 3 episodes, right
B = "<think>\nstep two\n</think>\nThe answer is \\boxed{5}."  # 1 episode, right
C = "<think>\nstep one\n</think>\nThe answer is \\boxed{3}."  # 1 episode, wrong


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model"])


@pytest.fixture()
def scripted(tokenizer, tmp_path):
    data = _write_jsonl(tmp_path / "scripted.jsonl", [_row("Problem P1", tier=1), _row("Problem P2", tier=2)])
    backend = ScriptedBackend(tokenizer, {"P1": [A, B], "P2": [A, C]})
    return backend, data


def _scripted_eval(backend, data, name=None, **analysis):
    return evaluate(
        "scripted",
        data,
        backend=backend,
        sampling=SamplingConfig(n=2, temperature=1.0, max_tokens=40),
        analysis=AnalysisConfig(episodes=EpisodeConfig(mode="delimiter"), force=ARITH, **analysis),
        name=name,
    )


# --------------------------------------------------------------------------- end to end (hf backend)


@pytest.mark.slow
def test_report_files_exist_and_are_non_empty(e2e):
    result, out = e2e
    for name in ("result.json", "samples.jsonl", "metrics.csv", "budgets.csv", "depth.csv"):
        assert (out / name).stat().st_size > 0, name
    for name in ("accuracy_vs_budget.png", "depth.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == len(result.samples) == 2 * 4 * 4  # two files x 4 rows x n=4
    with (out / "metrics.csv").open() as f:
        groups = [r["group"] for r in csv.DictReader(f)]
    assert groups[:3] == ["all", "dataset:test", "dataset:parity"]
    assert any(g.startswith("tier:") for g in groups)


def test_pass_at_1_is_the_mean_of_recomputed_sample_scores(e2e):
    result, out = e2e
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    rescored = [compute_score(s["data_source"], s["response"], s["ground_truth"]) for s in samples]
    assert rescored == [s["score"] for s in samples]
    assert 0 < sum(rescored) < len(rescored), "the fixture must give a mix of right and wrong samples"
    saved = json.loads((out / "result.json").read_text())
    assert saved["overall"]["pass@1"] == pytest.approx(sum(rescored) / len(rescored))
    for name in ("test", "parity"):
        mine = [sc for sc, s in zip(rescored, samples, strict=True) if s["dataset"] == name]
        assert saved["by_dataset"][name]["pass@1"] == pytest.approx(sum(mine) / len(mine))
    # maj@4 with n = 4: one vote per problem, recomputed from the saved answers.
    by_problem: dict[tuple, list[dict]] = {}
    for s in samples:
        by_problem.setdefault((s["dataset"], s["row"]), []).append(s)
    votes = [majority_score([s["answer"] for s in g], [s["score"] for s in g]) for g in by_problem.values()]
    assert saved["overall"]["maj@4"] == pytest.approx(sum(votes) / len(votes))
    assert load_result(out).pass_at_1 == pytest.approx(result.pass_at_1)


def test_budget_and_depth_records_follow_the_protocol(e2e):
    result, _ = e2e
    for r in result.samples:
        assert list(r.budget_scores) == [8, 24]
        for b in (8, 24):
            assert r.budget_tokens[b] <= b
            if r.finish_reason == "stop" and r.num_tokens <= b:
                assert r.budget_scores[b] == r.score and r.budget_tokens[b] == r.num_tokens
            else:
                assert r.budget_tokens[b] == min(b, r.reasoning_tokens)
        if r.sample < 2:  # depth_samples=2
            assert [e["k"] for e in r.depth] == list(range(r.num_episodes + 1))
            tokens = [e["tokens"] for e in r.depth]
            assert tokens[0] == 0 and tokens == sorted(set(tokens))
        else:
            assert r.depth is None
    curve = result.depth["all"]
    probed = [r for r in result.samples if r.depth]
    assert curve[0]["n"] == len(probed) == 2 * 8
    last = [r.depth[-1]["score"] for r in probed]
    assert curve[-1]["acc"] == pytest.approx(sum(last) / len(last))


# --------------------------------------------------------------------------- protocol, by hand


def test_depth_accuracy_is_computed_over_the_right_responses(scripted):
    backend, data = scripted
    result = _scripted_eval(backend, data, depth=True)
    # Per response, forced answers right (1) or wrong (0) at k = 0, 1, ...: A [0,0,1,1], B [0,1], C [0,0].
    # A response with fewer episodes carries its last value forward.
    acc = [p["acc"] for p in result.depth["all"]]
    assert acc == pytest.approx([0, 1 / 4, 3 / 4, 3 / 4])
    assert [p["n_reached"] for p in result.depth["all"]] == [4, 4, 2, 2]
    assert [p["acc_reached"] for p in result.depth["all"]] == pytest.approx([0, 1 / 4, 1, 1])
    assert [p["acc"] for p in result.depth["1"]] == pytest.approx([0, 1 / 2, 1, 1])  # P1: A, B
    assert [p["acc"] for p in result.depth["2"]] == pytest.approx([0, 0, 1 / 2, 1 / 2])  # P2: A, C
    tokens_a = [e["tokens"] for e in result.samples[0].depth]
    ids_a = backend.tokenizer.encode(A, add_special_tokens=False) + [backend.tokenizer.eos_token_id]
    assert tokens_a == [0, *segment_episodes(ids_a, backend.tokenizer, EpisodeConfig())]
    assert result.depth["all"][3]["tokens"] == pytest.approx(
        (2 * tokens_a[3] + result.samples[1].depth[-1]["tokens"] + result.samples[3].depth[-1]["tokens"]) / 4
    )
    # Only the first sample of each problem (A and A): B's and C's probes must not count.
    backend.probes.clear()
    first = _scripted_eval(backend, data, depth=True, depth_samples=1)
    assert [p["acc"] for p in first.depth["all"]] == pytest.approx([0, 0, 1, 1])
    assert first.samples[1].depth is None and first.samples[3].depth is None


def test_budget_truncation_keeps_at_most_budget_tokens(scripted):
    backend, data = scripted
    result = _scripted_eval(backend, data, budgets=[2, 6, 40])
    tok = backend.tokenizer
    force_ids = tok.encode(ARITH_FORCE, add_special_tokens=False)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Problem {p}"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for p in ("P1", "P2")
    ]
    expected, accuracy = set(), {2: [], 6: []}
    for i, (rec, text) in enumerate(zip(result.samples, [A, B, A, C], strict=True)):
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        think_end = ids.index(tok.convert_tokens_to_ids("</think>"))
        assert rec.num_tokens == len(ids) and rec.reasoning_tokens == think_end
        assert rec.budget_scores[40] == rec.score  # ended by itself within 40 tokens: kept whole
        for b in (2, 6):
            cut = min(b, think_end)
            assert budget_cut(rec.num_tokens, rec.finish_reason, rec.reasoning_tokens, b) == cut
            assert rec.budget_tokens[b] == cut <= b
            expected.add((i // 2, tuple(ids[:cut])))
            # The scripted model answers right iff the reasoning it was cut after mentions "step two".
            accuracy[b].append(float("step two" in tok.decode(ids[:cut])))
            assert rec.budget_scores[b] == accuracy[b][-1]
    seen = set()
    for probe in backend.probes:
        assert probe[-len(force_ids) :] == force_ids
        (which,) = [j for j, p in enumerate(prompts) if probe[: len(p)] == p]
        response = tuple(probe[len(prompts[which]) : -len(force_ids)])
        assert len(response) <= 6
        seen.add((which, response))
    assert seen == expected
    budgets = {p["budget"]: p["accuracy"] for p in result.overall["budgets"]}
    assert budgets[2] == 0.0  # two tokens never reach "step two"
    assert budgets[6] == pytest.approx(sum(accuracy[6]) / 4)
    assert budgets[40] == pytest.approx(result.pass_at_1) == 0.75


def test_maj_at_k_on_hand_made_votes():
    # Majority "12" (2 of 4; a None answer does not vote) wins; its first carrier scored 1.
    assert majority_score(["12", "7", None, " 12 "], [1.0, 0.0, 0.0, 1.0]) == 1.0
    # Tie 2-2: the answer seen first in the group wins.
    assert majority_score(["7", "12", "12", "7"], [0.0, 1.0, 1.0, 0.0]) == 0.0
    assert majority_score(["\\frac{1}{2}", "\\left(\\frac{1}{2}\\right)", "3", None], [1, 0, 0, 0]) == 1.0
    assert majority_score([None, None, None, None], [1.0, 1.0, 1.0, 1.0]) == 0.0
    answers = [["1", "1", "2", "2", "3", "3", "3", "4", "9"], ["5", "5", "5", "6", "6", "6", "6", "5", "5"]]
    scores = [[1, 1, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0, 0]]
    # Groups of 4 consecutive samples, the 9th sample unused: problem 1 -> [1, 0], problem 2 -> [0, 1].
    assert maj_at_k(answers, scores, k=4) == pytest.approx(0.5)
    assert maj_at_k([["1", "2", "3"]], [[1, 0, 0]], k=4) is None


def test_forced_answer_is_cut_where_the_forced_box_closes():
    assert cut_forced_answer("36}. Then \\boxed{7}", 1, "}.") == "36}."
    assert cut_forced_answer("\\frac{1}{2}} and more", 1, "}") == "\\frac{1}{2}}"
    assert cut_forced_answer("42 is it", 1, "}") == "42 is it"
    assert cut_forced_answer("the answer is 3.\nmore", 0, ".\n") == "the answer is 3.\n"


def test_reasoning_end_is_found_on_character_offsets(tokenizer):
    ids = tokenizer.encode(C, add_special_tokens=False)
    assert reasoning_end(ids, tokenizer) == ids.index(tokenizer.convert_tokens_to_ids("</think>"))
    no_close = tokenizer.encode("<think>\nstep one", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert reasoning_end(no_close, tokenizer) == len(no_close) - 1


# --------------------------------------------------------------------------- comparison


def test_compare_writes_table_and_plot(e2e, scripted, tmp_path):
    result, out = e2e
    backend, data = scripted
    other = _scripted_eval(backend, data, budgets=[8, 24], depth=True, name="scripted")
    rows = compare({"real": load_result(out), "scripted": other}, tmp_path / "cmp")
    assert [r["run"] for r in rows] == ["real", "scripted"]
    assert rows[0]["relative_tokens"] == 1.0
    assert rows[1]["relative_tokens"] == pytest.approx(other.mean_tokens / result.mean_tokens)
    assert rows[1]["pass@1"] == pytest.approx(0.75) and rows[0]["pass@1"] == pytest.approx(result.pass_at_1)
    assert rows[1]["acc@24"] == other.budget_accuracy()[24]
    with (tmp_path / "cmp" / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["real", "scripted"] and "acc@8" in table[0]
    assert (tmp_path / "cmp" / "comparison.md").read_text().count("\n") == 4
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- bad input


def _one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_bad_inputs_give_one_line_errors(assets, tmp_path):
    model = assets["model"]
    with pytest.raises(EvaluationError) as e:
        evaluate(model, tmp_path / "missing.parquet")
    _one_line_error(e, "missing.parquet", "not found")
    bad = _write_jsonl(tmp_path / "bad.jsonl", [_row("ok"), _row("no truth", truth="  ")])
    with pytest.raises(EvaluationError) as e:
        evaluate(model, bad)
    _one_line_error(e, "bad.jsonl", "row 1", "reward_model.ground_truth")
    unknown = _write_jsonl(tmp_path / "src.jsonl", [_row("x", source="no_such_benchmark")])
    with pytest.raises(EvaluationError) as e:
        evaluate(model, unknown)
    _one_line_error(e, "src.jsonl", "row 0", "data_source")
    good = _write_jsonl(tmp_path / "good.jsonl", [_row("Start at 1. Add 1.", truth="2")])
    with pytest.raises(EvaluationError) as e:
        evaluate(model, good, backend="tpu")
    _one_line_error(e, "unknown backend", "'tpu'")
    with pytest.raises(EvaluationError) as e:
        evaluate(
            model, good, sampling=SamplingConfig(max_tokens=64), analysis=AnalysisConfig(budgets=[32, 128])
        )
    _one_line_error(e, "budget 128", "max_tokens=64")
    with pytest.raises(EvaluationError) as e:
        evaluate(tmp_path / "no_model", good)
    _one_line_error(e, "no_model", "does not exist")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_says_so(assets):
    with pytest.raises(EvaluationError) as e:
        make_backend("vllm", assets["model"])
    _one_line_error(e, "vllm", "not installed")


# --------------------------------------------------------------------------- checkpoints + CLIs


def _fake_fsdp_checkpoint(model_dir: Path, root: Path, step: int) -> Path:
    """What verl's FSDP checkpoint manager writes without hf_model: shards + huggingface/ config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    actor = root / f"global_step_{step}" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.save(model.state_dict(), actor / "model_world_size_1_rank_0.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    AutoConfig.from_pretrained(model_dir).save_pretrained(actor / "huggingface")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(actor / "huggingface")
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))
    return actor


def test_checkpoint_layouts_resolve_without_merging(assets, tmp_path):
    model = assets["model"]
    assert resolve_model(model) == str(model)
    assert resolve_model("hf:Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    root = tmp_path / "ckpts"
    for step in (2, 10):  # verl saved hf_model: huggingface/ holds the weights
        target = root / f"global_step_{step}" / "actor" / "huggingface"
        target.mkdir(parents=True)
        for f in model.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
    assert resolve_model(root) == str(root / "global_step_10" / "actor" / "huggingface")
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    assert resolve_model(root) == str(root / "global_step_2" / "actor" / "huggingface")
    assert resolve_model(root / "global_step_10") == str(root / "global_step_10" / "actor" / "huggingface")
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(EvaluationError) as e:
        resolve_model(root)
    _one_line_error(e, "latest_checkpointed_iteration.txt", "global_step_7")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluationError) as e:
        resolve_model(empty)
    _one_line_error(e, "neither a HF model dir")


@pytest.mark.slow
def test_cli_merges_fsdp_checkpoint_evaluates_and_compares(assets, e2e, tmp_path):
    from transformers import AutoModelForCausalLM

    actor = _fake_fsdp_checkpoint(assets["model"], tmp_path / "ckpts", step=3)
    out = tmp_path / "cli_run"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "eval" / "evaluate.py"),
        "--model",
        str(tmp_path / "ckpts"),
        "--data",
        str(assets["test"]),
        "--limit",
        "2",
        "--n",
        "2",
        "--max-tokens",
        "32",
        "--budgets",
        "8,16",
        "--depth",
        "--task",
        "arith",
        "--threads",
        "1",
        "--output",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pass@1=" in proc.stdout and "budget 16" in proc.stdout
    merged = actor / "huggingface_merged"
    saved = json.loads((out / "result.json").read_text())
    assert saved["model_dir"] == str(merged)
    assert saved["name"] == "ckpts@global_step_3"  # default name: run dir + checkpoint step
    assert saved["config"]["force"]["force_suffix"] == ARITH_FORCE
    original = AutoModelForCausalLM.from_pretrained(assets["model"]).state_dict()
    roundtrip = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    for key, value in original.items():  # verl's merger stores bfloat16
        torch.testing.assert_close(roundtrip[key], value.to(torch.bfloat16).float())
    assert (out / "depth.png").stat().st_size > 0

    _, e2e_out = e2e
    cmp_dir = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval" / "compare.py"), str(e2e_out), str(out)]
        + ["--names", "e2e,cli", "--output", str(cmp_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| e2e |" in proc.stdout and "| cli |" in proc.stdout
    assert (cmp_dir / "comparison.png").stat().st_size > 0
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "eval" / "compare.py"),
            str(tmp_path),
            "--output",
            str(cmp_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "result.json" in bad.stderr
