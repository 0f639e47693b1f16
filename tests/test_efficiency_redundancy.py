"""Counting the tokens a response spends in redundant episodes (benchmarks/efficiency/redundancy.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# benchmarks/ is not an installed package: make the repository root importable however pytest is run.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.efficiency.redundancy import classify_episode, episode_breakdown, redundant_tokens  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from l2t_verl.assets import build_tokenizer, tokenizer_corpus

    return build_tokenizer(tokenizer_corpus(0, n=300))


def _response(tokenizer, episodes: list[str], answer: str) -> tuple[list[int], list[int]]:
    """Response ids built piece by piece, so the token span of every episode is known exactly:
    ``<think>\\n e1 \\n\\n e2 ... \\n</think>\\nThe answer is \\boxed{answer}.<|im_end|>``."""

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pieces = []
    for i, ep in enumerate(episodes):
        text = ("<think>\n" if i == 0 else "") + ep + ("\n\n" if i < len(episodes) - 1 else "\n")
        pieces.append(enc(text))
    tail = enc(f"</think>\nThe answer is \\boxed{{{answer}}}.") + [tokenizer.eos_token_id]
    return [t for p in pieces for t in p] + tail, [len(p) for p in pieces]


def test_classify_episode():
    assert classify_episode("<think>\n7 + 5 = 12") == "step"
    assert classify_episode("12 * 3 = 36\n\n") == "step"
    assert classify_episode("Check: 7 + 5 = 12") == "redundant"
    assert classify_episode("So far we have 36.") == "redundant"
    assert classify_episode("Let me re-read the question.") == "redundant"
    assert classify_episode("12 * = 3") == "other"


def test_breakdown_counts_the_tokens_of_each_redundant_episode(tokenizer):
    episodes = [
        "So far we have 7.",
        "7 + 5 = 12",
        "Check: 7 + 5 = 12",
        "12 * 3 = 36",
        "Let me re-read the question.",
    ]
    ids, lengths = _response(tokenizer, episodes, "36")
    b = episode_breakdown(ids, tokenizer)
    assert b.kinds == ["redundant", "step", "redundant", "step", "redundant"]
    assert b.num_redundant == 3
    assert b.tokens["redundant"] == lengths[0] + lengths[2] + lengths[4]
    assert b.tokens["step"] == lengths[1] + lengths[3]
    assert b.tokens["other"] == 0
    assert sum(b.tokens.values()) == len(ids)
    assert redundant_tokens(ids, tokenizer) == b.tokens["redundant"]


def test_sft_traces_redundancy_is_recovered(tokenizer):
    from l2t_verl.arith_task import make_problems
    from l2t_verl.warm_start import is_necessary_step, sft_traces

    rows = make_problems(40, 0)
    traces = sft_traces(rows, seed=1, redundant_max=3)
    for trace in traces:
        body = trace.split("</think>")[0].removeprefix("<think>\n").rstrip("\n")
        episodes = body.split("\n\n")
        ids, lengths = _response(tokenizer, episodes, trace.split("boxed{")[1].split("}")[0])
        b = episode_breakdown(ids, tokenizer)
        expected = [not is_necessary_step(e) for e in episodes]  # what sft_traces inserted
        assert b.num_redundant == sum(expected)
        assert b.tokens["redundant"] == sum(n for n, red in zip(lengths, expected, strict=True) if red)


def test_degenerate_responses(tokenizer):
    assert episode_breakdown([], tokenizer).tokens == {"step": 0, "redundant": 0, "other": 0, "tail": 0}
    ids = tokenizer("7 + 5 = 12", add_special_tokens=False)["input_ids"]  # no think block, no answer
    b = episode_breakdown(ids, tokenizer)
    assert b.kinds == ["step"] and b.tokens["step"] == len(ids)


def test_signal_summary_per_episode_class(tokenizer):
    """benchmarks/efficiency/signal.py on hand-made dumps: per-class means and the bootstrap interval."""
    from benchmarks.efficiency.signal import summarize

    def dump(episodes, delta_j, p_hat):
        ids, lengths = _response(tokenizer, episodes, "8")
        ends = [sum(lengths[: k + 1]) for k in range(len(lengths))]
        k = len(ends)
        return {
            "response_ids": ids,
            "episode_ends": ends,
            "rewarded": [True] * k,
            "delta_j": delta_j,
            "penalty_hat": p_hat,
            "process_reward": [d - 0.6 * p for d, p in zip(delta_j, p_hat, strict=True)],
            "process_reward_normalized": [0.5] * k,
            "advantages": [1.0] * len(ids),
        }

    good = dump(["5 + 3 = 8", "Check: 5 + 3 = 8"], [0.6, 0.0], [0.1, 0.3])
    other = dump(
        ["2 + 6 = 8", "So far we have 8.", "Let me re-read the question."],
        [0.4, 0.02, -0.02],
        [0.2, 0.1, 0.1],
    )
    failed = {**good, "rewarded": [False, False]}  # probes failed: not counted
    report = summarize({1: [good, other, failed], 2: [good, other]}, tokenizer, draws=200, seed=0)
    necessary, redundant = report["per_class"]["necessary"], report["per_class"]["redundant"]
    assert report["responses"] == 4 and necessary["episodes"] == 4 and redundant["episodes"] == 6
    assert necessary["delta_j"] == pytest.approx(0.5) and redundant["delta_j"] == pytest.approx(0.0)
    assert necessary["penalty_hat"] == pytest.approx(0.15)  # from step 2 only
    assert redundant["process_reward"] == pytest.approx((0.0 - 0.18 + 0.02 - 0.06 - 0.02 - 0.06) / 3)
    assert report["diff"] == pytest.approx(0.5)
    lo, hi = report["diff_ci95"]
    assert lo <= 0.5 <= hi and lo > 0.3
    positions = report["per_position"]
    assert positions["necessary, last"]["episodes"] == 4 and "necessary, earlier" not in positions
    assert positions["redundant, after the last step"]["episodes"] == 6
