"""Benchmark the J_r probes (docs/method.md §2): prefix reuse against naive re-scoring, on the local HFEngine.

    python benchmarks/probes.py [--ks 1,2,4,8,16] [--prompts 8 --n 4] [--repeats 2] [--random-model 4x512]

The quickstart's rollout, at engine level: the warm-started tiny model of the offline assets
(``l2t_verl.assets.build_all``, reused when up to date), ``--prompts`` test prompts (chat template)
x ``--n`` samples, each sent as its own request like verl's agent loop does, generated in one
``HFEngine.generate`` batch (temperature 1, at most ``--max-tokens`` tokens, fixed seeds: every
repeat generates the same responses). Then, per response, the K+1 likelihood probes
``prompt + response[:b_k] + force + answer`` of ``l2t_verl.progress.compute_progress`` (the agent
loop's own function, the arith task's force/answer suffixes), scored through ``HFEngine.score``
behind an adapter that answers like the ``hf`` server (``prompt_logprobs``, ``num_cached_tokens``):

- ``reuse``: the server's behaviour: the prefix cache as generation left it (every response's KV),
  the probes of all responses issued at once (response-major order, as the agent loop sends them);
- ``naive``: the prefix cache cleared before every probe: each probe re-computes its whole prefix.

K: boundaries at equal token spacing over the whole response (fewer when a response is shorter
than K tokens), plus one row with the task's own segmentation (``l2t.episodes`` defaults: the
reasoning span split at blank lines, K varies per response). For every K and repeat the sides run
in the order generate -> reuse -> naive (reuse needs the cache generation left); the K order flips
on odd repeats. Reported: tokens the engine computed per response (``probe_tokens`` of
``compute_progress``, checked against the engine's own counters), time per response, the probe
time as a share of the generation time of the same batch, and max |J_r(reuse) - J_r(naive)|
(the KV reuse must not change the numbers). Times: best of the repeats, in process CPU seconds
(wall-clock alongside in the JSON), with one torch thread (``--threads``), as in penalty.py.
``--random-model 4x512`` scores with a random Qwen2 of that shape instead of the 0.4M-parameter
offline model, whose forward costs about the same for 10 tokens as for 150.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
from machine import cpu_model, load  # benchmarks/machine.py (scripts run from this folder)
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from l2t_verl.assets import build_all
from l2t_verl.episodes import EpisodeConfig, segment_episodes
from l2t_verl.local.hf_engine import HFEngine, SamplingSpec
from l2t_verl.probes import answer_token_ids, force_token_ids
from l2t_verl.progress import compute_progress
from l2t_verl.settings import ProgressConfig

# The arith task's suffixes (l2t_verl/config/task/arith.yaml): the warm-started model's own format.
ARITH_FORCE = "\n</think>\nThe answer is \\boxed{"
ARITH_ANSWER_SUFFIX = "}."


TIMERS = ("gen", "reuse", "naive", "gen_cpu", "reuse_cpu", "naive_cpu", "reuse_busy")


class ScoringServer:
    """What the ``hf`` rollout server does for a ``prompt_logprobs`` request with ``max_tokens=0``:
    ``HFEngine.score`` and the vLLM-style reply. ``naive`` clears the prefix cache first."""

    def __init__(self, engine: HFEngine, naive: bool) -> None:
        self.engine = engine
        self.naive = naive
        self.busy_s = 0.0  # engine time only, as the server spends it (it scores one request at a time)

    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> SimpleNamespace:
        start = time.perf_counter()
        if self.naive:
            self.engine.clear_prefix_cache()
        logps, reused = self.engine.score(prompt_ids)
        self.busy_s += time.perf_counter() - start
        return SimpleNamespace(
            token_ids=[],
            log_probs=None,
            stop_reason="completed",
            extra_fields={"prompt_logprobs": [[lp] for lp in logps] + [[0.0]], "num_cached_tokens": reused},
        )


def random_qwen2(shape: str, tokenizer: Any, seed: int) -> Qwen2ForCausalLM:
    """A random Qwen2 ``LAYERSxHIDDEN`` on the assets' tokenizer: big enough per token that the cost
    follows the token count, which the 0.4M-parameter offline model's per-call overheads hide."""
    layers, hidden = (int(x) for x in shape.lower().split("x"))
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).eval()


def equal_ends(length: int, k: int) -> list[int]:
    return sorted({max(1, round(j * length / k)) for j in range(1, k + 1)})


async def probe_all(
    server: ScoringServer, samples: list[dict], ends: list[list[int]], cfg: ProgressConfig, tokenizer: Any
) -> list[Any]:
    # All responses at once, as the agent loop's coroutines send them after a generation batch.
    return await asyncio.gather(
        *(
            compute_progress(
                s["prompt_ids"],
                s["response_ids"],
                e,
                s["ground_truth"],
                cfg,
                tokenizer,
                server.generate,
                score_max_tokens=0,
            )
            for s, e in zip(samples, ends, strict=True)
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", default="assets", help="offline assets folder (built if missing/stale)")
    parser.add_argument("--ks", default="1,2,4,8,16")
    parser.add_argument(
        "--random-model",
        default=None,
        metavar="LAYERSxHIDDEN",
        help="score with a random Qwen2 of this shape (e.g. 4x256) instead of the offline model",
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 by default: on a shared, oversubscribed machine two OpenMP threads "
        "wait for each other at every barrier (see benchmarks/penalty.py)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    load_start = load()
    ks = [int(x) for x in args.ks.split(",")]

    paths = build_all(Path(args.assets), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    if args.random_model:
        model = random_qwen2(args.random_model, tokenizer, args.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
    eos = model.config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos_ids[0]
    max_len = 96 + args.max_tokens + 64  # the quickstart's prompt + response budget + probe room
    # max_batch_size=64 and prefix_cache_entries=256: the hf server's defaults.
    engine = HFEngine(model, eos_token_ids=eos_ids, pad_token_id=pad, max_model_len=max_len, seed=args.seed)

    rows = pd.read_parquet(paths["test"]).head(args.prompts)
    requests, truths = [], []
    for i, row in enumerate(rows.itertuples()):
        messages = [dict(m) for m in row.prompt]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        for j in range(args.n):
            spec = SamplingSpec(max_tokens=args.max_tokens, temperature=1.0, seed=args.seed + 1000 * i + j)
            requests.append((ids, spec))
            truths.append(row.reward_model["ground_truth"])
    cfg = ProgressConfig(force_suffix=ARITH_FORCE, answer_suffix=ARITH_ANSWER_SUFFIX)
    force_len = len(force_token_ids(tokenizer, cfg))

    def generate() -> tuple[float, float, list[dict]]:
        engine.clear_prefix_cache()
        start, cpu = time.perf_counter(), time.process_time()
        outs = engine.generate(requests)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        samples = [
            {"prompt_ids": p, "response_ids": o[0].token_ids, "ground_truth": g}
            for (p, _), o, g in zip(requests, outs, truths, strict=True)
        ]
        return elapsed, cpu, samples

    # Warm-up (allocator, first-call overheads), not timed.
    _, _, samples = generate()
    natural = [segment_episodes(s["response_ids"], tokenizer, EpisodeConfig()) for s in samples]
    variants: list[tuple[str, Any]] = [(f"K={k}", k) for k in ks] + [("task segmentation", None)]

    results: dict[str, dict[str, list]] = {
        name: {
            key: [] for key in ("gen", "reuse", "naive", "gen_cpu", "reuse_cpu", "naive_cpu", "reuse_busy")
        }
        for name, _ in variants
    }
    tokens: dict[str, dict] = {}
    for r in range(args.repeats):
        for name, k in variants if r % 2 == 0 else variants[::-1]:
            gen_s, gen_cpu, samples = generate()
            ends = [
                natural[i] if k is None else equal_ends(len(s["response_ids"]), k)
                for i, s in enumerate(samples)
            ]
            measured = {}
            for side in ("reuse", "naive"):
                server = ScoringServer(engine, naive=side == "naive")
                before = dict(engine.stats)
                start, cpu = time.perf_counter(), time.process_time()
                out = asyncio.run(probe_all(server, samples, ends, cfg, tokenizer))
                results[name][side].append(time.perf_counter() - start)
                results[name][f"{side}_cpu"].append(time.process_time() - cpu)
                if side == "reuse":
                    results[name]["reuse_busy"].append(server.busy_s / results[name][side][-1])
                computed = engine.stats["score_tokens"] - before["score_tokens"]
                measured[side] = (out, computed)
            results[name]["gen"].append(gen_s)
            results[name]["gen_cpu"].append(gen_cpu)
            if name not in tokens:
                (reuse_out, reuse_engine), (naive_out, naive_engine) = measured["reuse"], measured["naive"]
                failed = [o.error for o in reuse_out + naive_out if o.failed]
                if failed:
                    raise RuntimeError(f"probe failed: {failed[0]}")
                count = len(samples)
                answer_len = statistics.mean(
                    len(answer_token_ids(tokenizer, str(s["ground_truth"]), cfg)) for s in samples
                )
                tokens[name] = {
                    "K_mean": statistics.mean(len(e) for e in ends),
                    "response_tokens_mean": statistics.mean(len(s["response_ids"]) for s in samples),
                    "prompt_tokens_mean": statistics.mean(len(s["prompt_ids"]) for s in samples),
                    "reuse_tokens_per_response": sum(o.probe_tokens for o in reuse_out) / count,
                    "naive_tokens_per_response": sum(o.probe_tokens for o in naive_out) / count,
                    # Engine counters must agree with what compute_progress reports as probe_tokens.
                    "engine_counters_agree": reuse_engine == sum(o.probe_tokens for o in reuse_out)
                    and naive_engine == sum(o.probe_tokens for o in naive_out),
                    # Spec 2's estimate of the reuse cost: (K+1) probes x (|force| + |y*|), plus the one
                    # shared token HFEngine.score feeds again to get the first new logits.
                    "spec_estimate_reuse_tokens_per_response": statistics.mean(
                        (len(e) + 1) * (force_len + answer_len + 1) for e in ends
                    ),
                    "max_abs_jr_diff_reuse_vs_naive": max(
                        abs(a - b)
                        for x, y in zip(reuse_out, naive_out, strict=True)
                        for a, b in zip(x.jr, y.jr, strict=True)
                    ),
                }

    table = []
    for name, _ in variants:
        # Best of the repeats (interference only adds time), in CPU seconds; wall-clock alongside.
        res = {key: min(v) for key, v in results[name].items()}
        count = len(requests)
        tok = tokens[name]
        table.append(
            {
                "variant": name,
                **tok,
                "token_ratio_naive_over_reuse": tok["naive_tokens_per_response"]
                / tok["reuse_tokens_per_response"],
                "gen_cpu_s": res["gen_cpu"],
                "gen_wall_s": res["gen"],
                "reuse_cpu_ms_per_response": 1000 * res["reuse_cpu"] / count,
                "naive_cpu_ms_per_response": 1000 * res["naive_cpu"] / count,
                "time_ratio_naive_over_reuse": res["naive_cpu"] / res["reuse_cpu"],
                "time_ratio_naive_over_reuse_wall": res["naive"] / res["reuse"],
                "reuse_share_of_generation": res["reuse_cpu"] / res["gen_cpu"],
                "naive_share_of_generation": res["naive_cpu"] / res["gen_cpu"],
                "reuse_share_of_generation_wall": res["reuse"] / res["gen"],
                # Share of the probe time spent inside HFEngine.score (the rest: compute_progress,
                # asyncio, the reply lists): what a server would be busy with.
                "reuse_engine_fraction": res["reuse_busy"],
            }
        )
    result = {
        "command": "python benchmarks/probes.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": load_start,
        "load_avg_end": load(),
        "model": args.random_model and f"random Qwen2 {args.random_model}" or "offline assets model",
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "responses": len(requests),
        "max_tokens": args.max_tokens,
        "force_tokens": force_len,
        "repeats": args.repeats,
        "estimator": "min over repeats of process CPU time (wall-clock alongside)",
        "rows": table,
        "wall_s": time.perf_counter() - wall_start,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    print(
        "\n| variant | K mean | tokens/resp reuse | spec est. | naive | naive/reuse | CPU ms/resp reuse | "
        "naive | naive/reuse | probes/gen reuse | naive | max dJr |"
    )
    print("|---" * 12 + "|")
    for t in table:
        print(
            f"| {t['variant']} | {t['K_mean']:.1f} | {t['reuse_tokens_per_response']:.0f} | "
            f"{t['spec_estimate_reuse_tokens_per_response']:.0f} | {t['naive_tokens_per_response']:.0f} | "
            f"{t['token_ratio_naive_over_reuse']:.1f}x | {t['reuse_cpu_ms_per_response']:.1f} | "
            f"{t['naive_cpu_ms_per_response']:.1f} | {t['time_ratio_naive_over_reuse']:.2f}x | "
            f"{t['reuse_share_of_generation']:.0%} | {t['naive_share_of_generation']:.0%} | "
            f"{t['max_abs_jr_diff_reuse_vs_naive']:.1e} |"
        )


if __name__ == "__main__":
    main()
