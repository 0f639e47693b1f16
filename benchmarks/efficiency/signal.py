"""Check L2T's signal before training on it: does J_r tell necessary steps from redundant ones?

    python -m benchmarks.efficiency.signal --assets DIR --out outputs/efficiency/signal [--steps 2]

Runs the real L2T trainer (``python -m l2t_verl.main preset=tiny task=arith algo=l2t``) from the warm
start for ``--steps`` steps with per-sample dumps (``l2t.dump_dir``), then classifies every episode of
the warm start's own samples from the trace format (necessary step / redundant / garbled,
:func:`benchmarks.efficiency.redundancy.classify_episode`) and reports per class: mean ``delta_J``, mean
``p_hat``, mean ``r_k``, mean ``r~`` and the mean advantage of its tokens. ``p_hat`` needs an update, so
the penalty figures come from step 2 on (its reference is the weights before step 1's update).

L2T can only prune over-thinking if necessary episodes have clearly larger ``delta_J`` than redundant
ones: the report gives that difference with a 95% bootstrap interval over responses.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.efficiency.redundancy import classify_episode
from benchmarks.efficiency.run import REPO, RunSpec, trainer_command
from l2t_verl import tiny_run
from l2t_verl.episodes import token_char_ends

CLASSES = {"step": "necessary", "redundant": "redundant", "other": "garbled"}
FIELDS = ("delta_j", "penalty_hat", "process_reward", "process_reward_normalized", "advantage")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--assets", type=Path, required=True, help="built by l2t_verl.assets / the efficiency run")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "efficiency" / "signal")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-response", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the L2T run")
    return p.parse_args(argv)


def episode_rows(dump: dict, tokenizer: Any) -> list[dict]:
    """One row per episode of a dumped sample: its class and the five per-episode quantities."""
    ids = dump["response_ids"]
    ends = dump["episode_ends"]
    if not ends or not all(dump.get("rewarded") or [False]):
        return []
    text, char_ends = token_char_ends(ids[: ends[-1]], tokenizer)
    advantages = dump["advantages"]
    rows, start = [], 0
    for k, end in enumerate(ends):
        lo = char_ends[start - 1] if start else 0
        rows.append(
            {
                "class": CLASSES[classify_episode(text[lo : char_ends[end - 1]])],
                "delta_j": dump["delta_j"][k],
                "penalty_hat": dump["penalty_hat"][k],
                "process_reward": dump["process_reward"][k],
                "process_reward_normalized": dump["process_reward_normalized"][k],
                "advantage": statistics.fmean(advantages[start:end]),
                "tokens": end - start,
            }
        )
        start = end
    # Where an episode sits relative to the last necessary step: on this task J_r can only rise when
    # the final value is computed, so the last step and what follows it behave differently.
    necessary = [i for i, r in enumerate(rows) if r["class"] == "necessary"]
    last = necessary[-1] if necessary else -1
    for i, r in enumerate(rows):
        if r["class"] == "necessary":
            r["position"] = "necessary, last" if i == last else "necessary, earlier"
        elif r["class"] == "redundant":
            r["position"] = (
                "redundant, after the last step" if i > last >= 0 else "redundant, before the last step"
            )
        else:
            r["position"] = "garbled"
    return rows


def _class_diff(responses: Sequence[list[dict]]) -> float | None:
    necessary = [r["delta_j"] for rows in responses for r in rows if r["class"] == "necessary"]
    redundant = [r["delta_j"] for rows in responses for r in rows if r["class"] == "redundant"]
    if not necessary or not redundant:
        return None
    return statistics.fmean(necessary) - statistics.fmean(redundant)


def bootstrap_ci(responses: Sequence[list[dict]], draws: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of mean dJ(necessary) - mean dJ(redundant), resampling responses."""
    rng = random.Random(seed)
    values = []
    for _ in range(draws):
        sample = [responses[rng.randrange(len(responses))] for _ in responses]
        diff = _class_diff(sample)
        if diff is not None:
            values.append(diff)
    values.sort()
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def _means_by(
    key: str, names: Sequence[str], responses: Sequence[list[dict]], penalised: Sequence[list[dict]]
) -> dict[str, dict[str, float | None]]:
    """Per value of ``key`` (class or position): episode count, mean tokens and delta_J over every step,
    the penalty terms over ``penalised`` (step 2 on). Values with no episode are left out."""
    out: dict[str, dict[str, float | None]] = {}
    for name in names:
        rows = [r for rs in responses for r in rs if r[key] == name]
        later = [r for rs in penalised for r in rs if r[key] == name]
        if not rows:
            continue
        out[name] = {
            "episodes": len(rows),
            "tokens": statistics.fmean(r["tokens"] for r in rows),
            "delta_j": statistics.fmean(r["delta_j"] for r in rows),
        }
        for field in FIELDS[1:]:
            out[name][field] = statistics.fmean(r[field] for r in later) if later else None
    return out


def summarize(dumps_by_step: dict[int, list[dict]], tokenizer: Any, draws: int, seed: int) -> dict[str, Any]:
    """Per-class means (``delta_J`` over every step, the penalty terms from step 2 on) and the
    necessary-minus-redundant ``delta_J`` difference with its bootstrap interval."""
    responses = [episode_rows(d, tokenizer) for step in sorted(dumps_by_step) for d in dumps_by_step[step]]
    penalised = [
        episode_rows(d, tokenizer) for step in sorted(dumps_by_step) if step >= 2 for d in dumps_by_step[step]
    ]
    responses = [r for r in responses if r]
    per_class = _means_by("class", [n for n in CLASSES.values()], responses, penalised)
    per_position = _means_by(
        "position", sorted({r["position"] for rs in responses for r in rs}), responses, penalised
    )
    diff = _class_diff(responses)
    return {
        "per_position": per_position,
        "responses": len(responses),
        "per_class": per_class,
        "dj_necessary": per_class.get("necessary", {}).get("delta_j"),
        "dj_redundant": per_class.get("redundant", {}).get("delta_j"),
        "diff": diff,
        "diff_ci95": list(bootstrap_ci(responses, draws, seed)) if diff is not None else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    assets = args.assets.resolve()
    dumps = args.out / "dumps"
    run = RunSpec("signal", "l2t", args.seed, [f"l2t.dump_dir={dumps}", *args.overrides])
    finished = tiny_run.run(trainer_command(run, args, assets, args.out), args.out, cwd=REPO, check=False)
    if finished.returncode != 0:
        sys.exit(f"signal: the L2T run failed (exit {finished.returncode}); see {finished.log}")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets / "model"))
    by_step = {
        int(path.stem.split("_")[1]): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(dumps.glob("step_*.jsonl"))
    }
    report = summarize(by_step, tokenizer, args.bootstrap, args.seed)
    (args.out / "signal.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
