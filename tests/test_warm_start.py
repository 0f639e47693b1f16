"""Tests for l2t_verl.warm_start: SFT traces, the warm-start loop and the evaluation helper."""

from __future__ import annotations

import collections
import re

import pytest
import torch

from l2t_verl import arith_task, assets
from l2t_verl import warm_start as ws
from l2t_verl.scoring import compute_score

# Small enough that every test here runs in well under a second on CPU.
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


@pytest.fixture(scope="module")
def tokenizer():
    # A smaller corpus than the asset build's: token ids do not matter here, build time does.
    return assets.build_tokenizer(assets.tokenizer_corpus(0, n=300))


def _think_episodes(trace: str) -> list[str]:
    assert trace.startswith("<think>\n")
    body = trace[len("<think>\n") : trace.index("\n</think>\n")]
    return body.split("\n\n")


def _worked_steps(row: dict) -> list[str]:
    return _think_episodes(arith_task.worked_solution(row))


# ------------------------------------------------------------------------------- sft_traces


@pytest.mark.parametrize("redundant_max", [1, 2, 4])
def test_sft_traces_structure(redundant_max: int) -> None:
    rows = arith_task.make_problems(300, seed=4)
    traces = ws.sft_traces(rows, seed=0, redundant_max=redundant_max)
    assert len(traces) == len(rows)
    extra_counts = collections.Counter()
    for row, trace in zip(rows, traces, strict=True):
        steps = _worked_steps(row)
        episodes = _think_episodes(trace)
        # Necessary steps are all there, in order; everything else is redundant.
        assert [e for e in episodes if ws.is_necessary_step(e)] == steps
        extra = len(episodes) - len(steps)
        assert 0 <= extra <= redundant_max
        extra_counts[extra] += 1
        # Each redundant episode is true given what was computed before it.
        start, _ = arith_task.parse_problem(row)
        done, value = [], start
        for episode in episodes:
            if ws.is_necessary_step(episode):
                done.append(episode)
                value = int(episode.rsplit(" ", 1)[1])
            elif episode.startswith("Check: "):
                assert episode[len("Check: ") :] in done
            elif episode.startswith("So far we have "):
                assert episode == f"So far we have {value}."
            else:
                assert episode == "Let me re-read the question."
        # The answer line is untouched, so the trace scores exactly like the worked solution.
        assert trace.endswith(arith_task.worked_solution(row).split("</think>")[1])
        gt = row["reward_model"]["ground_truth"]
        assert compute_score("l2t_arith", trace, gt) == 1.0
    # Counts are uniform on 0..redundant_max, so every count shows up in 300 draws.
    assert set(extra_counts) == set(range(redundant_max + 1))


@pytest.mark.parametrize("per_gap", [1, 2])
def test_sft_traces_per_gap_redundancy(per_gap: int) -> None:
    """Every gap (before the first step, between steps, after the last) gets 0..per_gap redundant
    episodes, so redundancy grows with the number of steps and every count occurs."""
    rows = arith_task.make_problems(300, seed=5, min_steps=1, max_steps=4)
    traces = ws.sft_traces(rows, seed=1, redundant_per_gap=per_gap)
    gap_counts = collections.Counter()
    for row, trace in zip(rows, traces, strict=True):
        episodes = _think_episodes(trace)
        assert [e for e in episodes if ws.is_necessary_step(e)] == _worked_steps(row)
        runs, current = [], 0
        for episode in episodes:
            if ws.is_necessary_step(episode):
                runs.append(current)
                current = 0
            else:
                current += 1
        runs.append(current)
        assert len(runs) == len(_worked_steps(row)) + 1 and all(0 <= r <= per_gap for r in runs)
        gap_counts.update(runs)
        assert compute_score("l2t_arith", trace, row["reward_model"]["ground_truth"]) == 1.0
    assert set(gap_counts) == set(range(per_gap + 1))
    with pytest.raises(ValueError, match="redundant_per_gap"):
        ws.sft_traces(rows, seed=0, redundant_per_gap=-1)


def test_sft_traces_without_redundancy_are_worked_solutions() -> None:
    rows = arith_task.make_problems(50, seed=1)
    assert ws.sft_traces(rows, seed=3, redundant_max=0) == [arith_task.worked_solution(r) for r in rows]


def test_sft_traces_deterministic_and_input_forms() -> None:
    rows = arith_task.make_problems(40, seed=2)
    assert ws.sft_traces(rows, seed=5) == ws.sft_traces(rows, seed=5)
    assert ws.sft_traces(rows, seed=5) != ws.sft_traces(rows, seed=6)
    # Raw prompt strings and message lists give the same traces as verl rows.
    texts = [r["prompt"][0]["content"] for r in rows]
    assert ws.sft_traces(texts, seed=5) == ws.sft_traces(rows, seed=5)
    assert ws.sft_traces([r["prompt"] for r in rows], seed=5) == ws.sft_traces(rows, seed=5)
    with pytest.raises(ValueError):
        ws.sft_traces(rows, seed=0, redundant_max=-1)


def test_redundant_episodes_are_not_necessary_steps() -> None:
    assert ws.is_necessary_step("12 * 3 = 36")
    for episode in ("Check: 12 * 3 = 36", "So far we have 36.", "Let me re-read the question.", "12 * 3"):
        assert not ws.is_necessary_step(episode)


# ------------------------------------------------------------------------------- warm_start


def _tiny_model(tokenizer, seed: int = 0):
    return assets.build_model(tokenizer, seed=seed, **TINY)


def test_sft_steps_reduce_loss_on_a_fixed_batch(tokenizer) -> None:
    rows = arith_task.make_problems(8, seed=0)
    model = _tiny_model(tokenizer)
    # One batch of all eight problems and no redundant episodes: every step sees the same batch.
    stats = ws.warm_start(
        model, tokenizer, rows, steps=15, lr=1e-2, batch_size=8, redundant_max=0, warmup_steps=1
    )
    losses = stats["losses"]
    assert len(losses) == 15 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
    assert stats["final_loss"] < stats["initial_loss"]
    assert stats["examples"] == 15 * 8 and stats["seconds"] > 0
    assert not model.training


def test_warm_start_deterministic_and_leaves_global_rng_alone(tokenizer) -> None:
    rows = arith_task.make_problems(24, seed=1)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = _tiny_model(tokenizer)
        stats = ws.warm_start(model, tokenizer, rows, steps=5, lr=1e-3, batch_size=4, seed=7, redundant_max=2)
        after = torch.rand(1)
        runs.append((stats, model.state_dict(), after))
    (s1, w1, r1), (s2, w2, r2) = runs
    assert s1["losses"] == s2["losses"] and s1["final_loss"] == s2["final_loss"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    torch.manual_seed(123)
    assert r1 == r2 == torch.rand(1)  # training consumed none of the caller's RNG stream

    other = ws.warm_start(_tiny_model(tokenizer), tokenizer, rows, steps=5, lr=1e-3, batch_size=4, seed=8)
    assert other["losses"] != s1["losses"]  # the seed drives the data order


def test_warm_start_wraps_epochs_and_validates(tokenizer) -> None:
    rows = arith_task.make_problems(6, seed=3)
    # 6 problems, batch 4: one full batch per epoch, so 3 steps span 3 epochs.
    stats = ws.warm_start(_tiny_model(tokenizer), tokenizer, rows, steps=3, batch_size=4)
    assert len(stats["losses"]) == 3
    with pytest.raises(ValueError, match="batch_size"):
        ws.warm_start(_tiny_model(tokenizer), tokenizer, rows, steps=1, batch_size=8)
    with pytest.raises(ValueError, match="steps"):
        ws.warm_start(_tiny_model(tokenizer), tokenizer, rows, steps=-1)


def test_loss_is_on_response_tokens_only(tokenizer) -> None:
    row = arith_task.make_problems(1, seed=0)[0]
    prompt = ws.chat_prompt_ids(tokenizer, row)
    expected = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert prompt == list(expected)
    response = tokenizer.encode(arith_task.worked_solution(row), add_special_tokens=False) + [
        tokenizer.eos_token_id
    ]
    input_ids, labels = ws._collate([(prompt, response), (prompt, response[:3])], tokenizer.pad_token_id)
    assert input_ids.shape == labels.shape == (2, len(prompt) + len(response))
    assert labels[0].tolist() == [-100] * len(prompt) + response
    assert labels[1].tolist() == [-100] * len(prompt) + response[:3] + [-100] * (len(response) - 3)
    assert input_ids[1, len(prompt) + 3 :].eq(tokenizer.pad_token_id).all()


# ------------------------------------------------------------------------------- evaluate


class _OracleModel(torch.nn.Module):
    """Stands in for a causal LM whose ``generate`` writes the worked solution, then pads."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        outs = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
            text = re.search(r"user\n(.*?)<\|im_end\|>", prompt, re.S).group(1)
            solution = self.tokenizer.encode(arith_task.worked_solution(text), add_special_tokens=False)
            outs.append(ids + (solution + [eos_token_id])[:max_new_tokens])
        width = max(map(len, outs))
        return torch.tensor([o + [pad_token_id] * (width - len(o)) for o in outs])


def test_evaluate_scores_and_counts(tokenizer) -> None:
    rows = arith_task.make_problems(10, seed=9)
    result = ws.evaluate_greedy(_OracleModel(tokenizer), tokenizer, rows, max_new_tokens=200, batch_size=4)
    assert result["accuracy"] == 1.0 and result["boxed_rate"] == 1.0
    lengths = [len(tokenizer.encode(arith_task.worked_solution(r))) + 1 for r in rows]  # + EOS
    assert result["mean_tokens"] == pytest.approx(sum(lengths) / len(rows))
    steps = [r["extra_info"]["num_steps"] for r in rows]
    assert result["mean_episodes"] == pytest.approx(sum(steps) / len(rows))
    assert result["accuracy_by_steps"] == {n: 1.0 for n in sorted(set(steps))}
    assert result["responses"] == [arith_task.worked_solution(r) for r in rows]

    # Truncated before the answer: no box, no reward, and the length is the budget.
    cut = ws.evaluate_greedy(_OracleModel(tokenizer), tokenizer, rows, max_new_tokens=5)
    assert cut["accuracy"] == 0.0 and cut["boxed_rate"] == 0.0 and cut["mean_tokens"] == 5


def test_evaluate_greedy_runs_on_a_real_model_and_batching_is_invisible(tokenizer) -> None:
    rows = arith_task.make_problems(6, seed=2)
    model = _tiny_model(tokenizer)
    batched = ws.evaluate_greedy(model, tokenizer, rows, max_new_tokens=6, batch_size=6)
    single = ws.evaluate_greedy(model, tokenizer, rows, max_new_tokens=6, batch_size=1)
    assert set(batched) >= {"accuracy", "mean_tokens"}
    assert 0.0 <= batched["accuracy"] <= 1.0 and 1 <= batched["mean_tokens"] <= 6
    # Left padding must not change what a prompt generates.
    assert batched["responses"] == single["responses"]

    torch.manual_seed(0)
    sampled = ws.evaluate(model, tokenizer, rows, max_new_tokens=6, temperature=1.0, seed=1)
    again = ws.evaluate(model, tokenizer, rows, max_new_tokens=6, temperature=1.0, seed=1)
    assert sampled["responses"] == again["responses"]
