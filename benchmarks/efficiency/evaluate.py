"""Held-out evaluation of one HF checkpoint on the synthetic arithmetic task.

Sampling at temperature 1 (``top_k=0``, ``top_p=1``, as verl's rollout samples during training): the
warm start's redundant episodes are a minority choice at each gap, so greedy decoding would hide most
of the over-thinking this benchmark is about.

Per model it reports pass@1 (mean over samples), mean response tokens, tokens in redundant episodes
(:mod:`benchmarks.efficiency.redundancy`), accuracy under token budgets (a response counts only if it
is right and at most B tokens long, i.e. what ``max_new_tokens=B`` would give), and Acc(k): the
greedy answer forced after the first k episodes (the task's force suffix, as the J_r probes of
training use), per difficulty tier.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.efficiency.redundancy import episode_breakdown
from l2t_verl.scoring import compute_score
from l2t_verl.warm_start import chat_prompt_ids as _prompt_ids

# Same strings as l2t_verl/config/task/arith.yaml: Acc(k) forces the answer exactly as training's probes do.
FORCE_SUFFIX = "\n</think>\nThe answer is \\boxed{"
ANSWER_SUFFIX = "}."
DATA_SOURCE = "l2t_arith"
BUDGETS = (16, 24, 32, 48, 64, 96, 128)


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    seed: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """Sampled response ids (EOS included when emitted) for each prompt, seeded."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for lo in range(0, len(prompts), batch_size):
            ids, mask = _left_pad(prompts[lo : lo + batch_size], pad)
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                eos_token_id=eos,
                pad_token_id=pad,
            )[:, ids.shape[1] :]
            for row in gen.tolist():
                out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def forced_answer_correct(
    model: Any, probes: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int, batch_size: int = 128
) -> list[bool]:
    """True where greedy decoding after ``probe`` would write exactly ``answer`` (every answer token is
    the argmax under teacher forcing): one forward per probe instead of a generate loop."""
    result: list[bool] = []
    with torch.no_grad():
        for lo in range(0, len(probes), batch_size):
            seqs = [
                p + a
                for p, a in zip(probes[lo : lo + batch_size], answers[lo : lo + batch_size], strict=True)
            ]
            ids, mask = _left_pad(seqs, pad_id)
            # Left padding shifts positions: pass position ids so padded rows see the same positions.
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            pred = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.argmax(-1)
            for i, ans in enumerate(answers[lo : lo + batch_size]):
                n = len(ans)
                # Logits at position t predict token t+1; the answer occupies the last n positions.
                got = pred[i, -n - 1 : -1].tolist()
                result.append(got == ans)
    return result


def evaluate_checkpoint(
    model_path: str | Path,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    samples: int,
    seed: int,
    max_new_tokens: int,
    budgets: Sequence[int] = BUDGETS,
) -> dict[str, Any]:
    """All metrics of one checkpoint on ``rows`` (verl rows with ``extra_info.tier``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    items = [(r, j) for r in rows for j in range(samples)]
    prompt_ids = [_prompt_ids(tokenizer, r) for r, _ in items]
    responses = sample_responses(model, tokenizer, prompt_ids, max_new_tokens, seed=seed)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    truths = [str(r["reward_model"]["ground_truth"]) for r, _ in items]
    tiers = [int(r["extra_info"]["tier"]) for r, _ in items]
    correct = [compute_score(DATA_SOURCE, t, g) >= 1.0 for t, g in zip(texts, truths, strict=True)]
    lengths = [len(r) for r in responses]
    breakdowns = [episode_breakdown(r, tokenizer) for r in responses]

    # Acc(k): forced answers after k = 0..K episodes of each response (the k = K probe is after the
    # whole reasoning span). Deeper k than a response has reuses its last probe: it stopped thinking.
    force = tokenizer(FORCE_SUFFIX, add_special_tokens=False)["input_ids"]
    probes, answers, owner = [], [], []
    for i, (p, resp, b) in enumerate(zip(prompt_ids, responses, breakdowns, strict=True)):
        answer = tokenizer(truths[i] + ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
        for end in [0, *b.ends]:
            probes.append(p + resp[:end] + force)
            answers.append(answer)
            owner.append(i)
    flags = forced_answer_correct(model, probes, answers, tokenizer.pad_token_id)
    per_response: list[list[bool]] = [[] for _ in items]
    for i, ok in zip(owner, flags, strict=True):
        per_response[i].append(ok)

    max_k = max(len(b.ends) for b in breakdowns)
    by_tier: dict[str, Any] = {}
    for tier in sorted(set(tiers)):
        idx = [i for i, t in enumerate(tiers) if t == tier]
        acc_k = [
            statistics.fmean(per_response[i][min(k, len(per_response[i]) - 1)] for i in idx)
            for k in range(max_k + 1)
        ]
        # Depth at which the forced answer first becomes (and stays) right, over responses right at the end.
        settled = [_settle_depth(per_response[i]) for i in idx if per_response[i][-1]]
        by_tier[str(tier)] = {
            "n": len(idx),
            "accuracy": statistics.fmean(correct[i] for i in idx),
            "mean_tokens": statistics.fmean(lengths[i] for i in idx),
            "mean_episodes": statistics.fmean(len(breakdowns[i].ends) for i in idx),
            "mean_redundant_episodes": statistics.fmean(breakdowns[i].num_redundant for i in idx),
            "mean_necessary_episodes": statistics.fmean(breakdowns[i].kinds.count("step") for i in idx),
            "settle_depth": statistics.fmean(settled) if settled else None,
            "acc_k": acc_k,
        }
    n = len(items)
    return {
        "n_responses": n,
        "accuracy": sum(correct) / n,
        "mean_tokens": statistics.fmean(lengths),
        "mean_redundant_tokens": statistics.fmean(b.tokens["redundant"] for b in breakdowns),
        "redundant_token_share": sum(b.tokens["redundant"] for b in breakdowns) / max(1, sum(lengths)),
        "mean_redundant_episodes": statistics.fmean(b.num_redundant for b in breakdowns),
        "mean_episodes": statistics.fmean(len(b.ends) for b in breakdowns),
        # Episodes the trace classifier calls necessary steps, over all responses (the tail is no episode).
        "mean_necessary_episodes": statistics.fmean(b.kinds.count("step") for b in breakdowns),
        "other_token_share": sum(b.tokens["other"] for b in breakdowns) / max(1, sum(lengths)),
        "budget_accuracy": {
            str(b): sum(c and n_tok <= b for c, n_tok in zip(correct, lengths, strict=True)) / n
            for b in budgets
        },
        "by_tier": by_tier,
        "examples": [texts[i] for i in range(min(3, n))],
    }


def _settle_depth(flags: Sequence[bool]) -> int:
    """Smallest k such that the forced answers at every depth >= k are right."""
    k = len(flags)
    while k > 0 and flags[k - 1]:
        k -= 1
    return k
