"""Benchmark one L2T training step against one GRPO step, with verl's real trainer on CPU.

    python benchmarks/step.py [--steps 5] [--pairs 2] [--out outputs/benchmarks/step]

The quickstart configuration (``scripts/quickstart.sh``: ``preset=tiny task=arith``, the warm-started
offline assets, batch 8 prompts x n 4, prompt/response <= 96 tokens, lr 5e-5, no KL loss), run as
``python -m l2t_verl.main`` through :mod:`l2t_verl.tiny_run` in alternating runs: grpo, l2t, grpo, l2t
(``--pairs`` pairs) of ``--steps`` steps each, so that load drift on a shared machine hits both methods
alike. Step 1 of every run is dropped (warm-up; for L2T it also has no penalty:
``reference=previous_step`` has no update yet). No checkpoint, no validation (``save_freq``/``test_freq``
= -1).

Per step, from verl's ``metrics.jsonl`` (``timing_s/*`` are verl's ``marked_timer`` phases):

- ``gen`` = ``timing_s/gen``: waiting for the rollout (generation, reward, and for L2T the J_r
  probes, which run inside the rollout workers);
- ``old_log_prob`` = ``timing_s/old_log_prob`` minus ``timing_s/l2t_penalty``: verl's timer wraps
  the trainer's ``_compute_old_log_prob``, which the L2T trainer extends with the penalty;
- ``penalty`` = ``timing_s/l2t_penalty`` (= ``l2t/penalty_time_s`` up to the timer's own overhead);
- ``adv``, ``update_actor``, ``update_weights``; ``other`` = ``timing_s/step`` minus all of these;
- ``l2t/probe_time_s`` is a SUM over the 32 responses of each response's probe wall time, and the
  probes of different responses overlap, so it is not a share of the step: it is reported divided
  by the response count (the mean probe latency of a response); the probes' cost to the step is
  estimated by ``gen(L2T) - gen(GRPO)``.

verl's sync sampler polls the rollout every 2 s, which rounds ``timing_s/gen`` (and the step) up to
a multiple of 2 s (e.g. 4.02 s, 6.02 s): too coarse to see a probe cost of a second. Both methods
therefore run with :class:`FinePollReplayBuffer` (verl's own ``trainer.v1.sampler.custom_sampler``
hook): the same sampler with a 0.05 s poll. ``--verl-sampler`` keeps verl's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from l2t_verl import tiny_run

POLL_INTERVAL_S = 0.05
BATCH, N = 8, 4  # the quickstart's prompts per step and samples per prompt
TARGET_RATIO = 1.6
PHASES = ("gen", "old_log_prob", "penalty", "adv", "update_actor", "update_weights", "other")


class FinePollReplayBuffer(ReplayBuffer):
    """verl's sync sampler, polling every 50 ms instead of 2 s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["poll_interval"] = POLL_INTERVAL_S
        super().__init__(*args, **kwargs)


def trainer_command(assets: Path, out: Path, algo: str, steps: int, fine_poll: bool) -> list[str]:
    overrides = [
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        f"trainer.experiment_name=bench_step_{algo}",
    ]
    if fine_poll:
        # Both trainers run as verl's sync loop, whose sampler is ReplayBuffer.
        overrides += [
            f"trainer.v1.sampler.custom_sampler.path={Path(__file__).resolve()}",
            "trainer.v1.sampler.custom_sampler.name=FinePollReplayBuffer",
        ]
    return tiny_run.command(assets, out, algo, steps, batch=BATCH, n=N, data_seed=0, overrides=overrides)


def run(assets: Path, out: Path, algo: str, steps: int, fine_poll: bool, timeout_s: float) -> dict:
    cmd = trainer_command(assets, out, algo, steps, fine_poll)
    finished = tiny_run.run(cmd, out, cwd=out, timeout_s=timeout_s)
    return {"algo": algo, "wall_s": finished.wall_s, "steps": finished.steps()}


def phases(step: dict) -> dict[str, float]:
    """One step's time split into phases that add up to ``timing_s/step``."""
    penalty = step.get("timing_s/l2t_penalty", 0.0)
    out = {
        "gen": step["timing_s/gen"] + step.get("timing_s/reward", 0.0),
        "old_log_prob": step["timing_s/old_log_prob"] - penalty,
        "penalty": penalty,
        "adv": step["timing_s/adv"],
        "update_actor": step["timing_s/update_actor"],
        "update_weights": step.get("timing_s/update_weights", 0.0),
    }
    out["other"] = step["timing_s/step"] - sum(out.values())
    out["step"] = step["timing_s/step"]
    return out


def summarize(runs: list[dict], algo: str, responses: int) -> dict:
    measured = [s for r in runs if r["algo"] == algo for s in r["steps"][1:]]
    if not measured:
        raise RuntimeError(f"no measured {algo} step: every run needs at least 2 steps")
    split = [phases(s) for s in measured]
    summary = {f"{p}_s": statistics.mean(x[p] for x in split) for p in (*PHASES, "step")}
    summary["step_s_min"] = min(x["step"] for x in split)
    summary["step_s_max"] = max(x["step"] for x in split)
    summary["measured_steps"] = len(measured)
    summary["response_length_mean"] = statistics.mean(s["response_length/mean"] for s in measured)
    summary["gen_ms_per_response_token"] = 1000 * statistics.mean(
        phases(s)["gen"] / (s["response_length/mean"] * responses) for s in measured
    )
    if algo == "l2t":
        summary["probe_time_sum_s"] = statistics.mean(s["l2t/probe_time_s"] for s in measured)
        summary["probe_latency_per_response_s"] = summary["probe_time_sum_s"] / responses
        summary["probe_tokens_per_response"] = statistics.mean(
            s["l2t/probe_tokens_per_response"] for s in measured
        )
        summary["episodes_per_response"] = statistics.mean(
            s["l2t/episodes_per_response/mean"] for s in measured
        )
        summary["penalty_time_s_metric"] = statistics.mean(s["l2t/penalty_time_s"] for s in measured)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", default="assets", help="offline assets folder (built if missing/stale)")
    parser.add_argument("--steps", type=int, default=5, help="steps per run; step 1 is dropped")
    parser.add_argument("--pairs", type=int, default=2, help="grpo/l2t run pairs, alternating")
    parser.add_argument("--out", default="outputs/benchmarks/step")
    parser.add_argument("--verl-sampler", action="store_true", help="keep verl's 2 s rollout polling")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per trainer run")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    # Imported here, not at the top: verl also loads this file in its Ray workers for the sampler class,
    # where neither transformers nor benchmarks/ (on sys.path only when run as a script) is needed.
    from machine import cpu_model, load

    from l2t_verl.assets import build_all

    wall_start = time.perf_counter()
    load_start = load()
    assets = build_all(Path(args.assets), seed=0)["root"].resolve()
    out = Path(args.out).resolve()
    responses = BATCH * N
    runs = []
    for pair in range(args.pairs):
        for algo in ("grpo", "l2t"):
            result = run(
                assets, out / f"{pair}_{algo}", algo, args.steps, not args.verl_sampler, args.timeout_s
            )
            runs.append(result)
            steps = [round(s["timing_s/step"], 2) for s in result["steps"]]
            print(f"[step] run {pair} {algo}: {result['wall_s']:.0f} s, timing_s/step {steps}", flush=True)

    grpo, l2t = summarize(runs, "grpo", responses), summarize(runs, "l2t", responses)
    per_pair = []
    for pair in range(args.pairs):
        g, m = runs[2 * pair], runs[2 * pair + 1]
        g_step = statistics.mean(s["timing_s/step"] for s in g["steps"][1:])
        m_step = statistics.mean(s["timing_s/step"] for s in m["steps"][1:])
        per_pair.append({"grpo_step_s": g_step, "l2t_step_s": m_step, "ratio": m_step / g_step})
    ratio = l2t["step_s"] / grpo["step_s"]
    shares = {p: l2t[f"{p}_s"] / l2t["step_s"] for p in PHASES}
    result = {
        "command": "python benchmarks/step.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_start": load_start,
        "load_avg_end": load(),
        "sampler_poll_s": 2.0 if args.verl_sampler else POLL_INTERVAL_S,
        "steps_per_run": args.steps,
        "pairs": args.pairs,
        "run_wall_s": [round(r["wall_s"], 1) for r in runs],
        "grpo": grpo,
        "l2t": l2t,
        "per_pair": per_pair,
        "l2t_over_grpo_step": ratio,
        "l2t_phase_shares": shares,
        "dominant_l2t_phase": max(shares, key=shares.get),
        "probe_cost_estimate_s": l2t["gen_s"] - grpo["gen_s"],
        "target_l2t_over_grpo<=1.6": "met" if ratio <= TARGET_RATIO else "NOT met",
        "wall_s": time.perf_counter() - wall_start,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    print("\n| phase (s, mean of measured steps) | GRPO | L2T | L2T - GRPO |")
    print("|---|---|---|---|")
    for p in (*PHASES, "step"):
        print(f"| {p} | {grpo[f'{p}_s']:.3f} | {l2t[f'{p}_s']:.3f} | {l2t[f'{p}_s'] - grpo[f'{p}_s']:+.3f} |")
    print(
        f"\nL2T/GRPO step: {ratio:.2f} (target <= {TARGET_RATIO}: {result['target_l2t_over_grpo<=1.6']}); "
        f"per pair {[round(p['ratio'], 2) for p in per_pair]}; "
        f"dominant L2T phase: {result['dominant_l2t_phase']}"
    )


if __name__ == "__main__":
    main()
