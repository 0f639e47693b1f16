"""Benchmark the compression penalty (docs/method.md §3): fast path against the exact per-episode gradients.

    python benchmarks/penalty.py [--device cpu|cuda] [--dtype float32|bfloat16] [--threads 1]

On a random Qwen2 (default 4 layers, hidden 256, MLP 512, vocab 2048), a micro-batch of
``--batch`` x ``--seq`` tokens (prompt = the first eighth, the rest cut into K equal episodes),
proxy P = the last layer's MLP (3 matrices, 393k weights), rank-8 update, for K in {1, 4, 16, 64}:

1. scaling: ``episode_penalties`` (``forward_ad`` and ``reverse``, the actor's two methods) against ONE
   log-prob forward of the same micro-batch (forward + log-softmax + gather, as the actor's
   ``compute_log_prob``), every K and method timed round-robin in each repeat, so that load drift
   on a shared machine hits all of them alike: gives time(K) / time(K=1) and penalty / forward;
2. against the exact reference: per (sample, episode) one autograd backward for ``g_k``, then
   ``<dW_r, g_k>^2 + damping ||dW_r||^2``; the fast path is timed right before it in each repeat.
   This is :func:`episode_penalties_exact` without its explicit ``g g^T + damping I`` matrix, which
   would be 393k x 393k here (the library function refuses proxies above 8192 weights); the
   quadratic form is the same number. That identity is checked at start-up on a tiny model
   (proxy of 1536 weights) against the library's ``episode_penalties_exact`` itself.

``--memory`` measures peak memory instead (docs/benchmarks.md): on a random Qwen2 with hidden 256,
2 layers and V = 151,936, batch 1, T in ``--memory-seqs`` (4,096 and 8,192), each variant runs in its
own process, which reports its peak RSS minus its RSS after the model is loaded: the log-prob forward
as verl computes it (HF forward, full-vocabulary log-softmax, gather) and the penalty with each of
``--methods``. Target: the penalty <= 1.5x the log-prob forward.

Timing: each figure is the best (minimum) of its repeats, in process CPU seconds, with the
wall-clock minimum alongside; all ratios come from this one run. On a shared machine interference
only adds time, and CPU time does not count the time the process waits for a core. CPU runs use ONE
intra-op thread by default (``--threads``): on an oversubscribed 2-core box two OpenMP threads wait
for each other at every barrier, which made the same forward 10-20x slower and erratic. The exact
reference costs one backward per episode (B x K in all: 256 at K=64), so it gets ``--exact-repeats``
(2) against the fast path's ``--repeats`` (7).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from machine import cpu_model, load  # benchmarks/machine.py (scripts run from this folder)
from transformers import Qwen2Config, Qwen2ForCausalLM

from l2t_verl.penalty import (
    LowRankUpdate,
    episode_penalties,
    episode_penalties_by_gradients,
    episode_penalties_exact,
    full_vocab_logprobs,
    last_layer_mlp_regex,
    select_proxy_params,
)

TARGET_SPEEDUP_K16 = 10.0
TARGET_MAX_REL_ERR = 1e-3
TARGET_K64_OVER_K1 = 1.3
TARGET_OVER_FORWARD = 3.0
TARGET_MEMORY_OVER_FORWARD = 1.5
MEMORY_MODEL = {"layers": 2, "hidden": 256, "vocab": 151_936}


def build(
    device: str, dtype: torch.dtype, layers: int, hidden: int, vocab: int, seed: int = 0
) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=2048,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


def random_update(model: torch.nn.Module, rank: int, scale: float, seed: int) -> LowRankUpdate:
    """dW_r of a random step W_ref = W - scale * N(0, 1) on the default proxy set."""
    gen = torch.Generator().manual_seed(seed)
    regex = last_layer_mlp_regex(model)
    reference = {
        n: p.detach() - scale * torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        for n, p in select_proxy_params(model, regex).items()
    }
    return LowRankUpdate.from_weights(model, reference, modules=regex, rank=rank)


def equal_episodes(ids: torch.Tensor, prompt: int, k: int) -> torch.Tensor:
    """Episode ids: -1 on the prompt, then K episodes of (nearly) equal length."""
    episodes = torch.full_like(ids, -1)
    span = ids.shape[1] - prompt
    episodes[:, prompt:] = (torch.arange(span, device=ids.device) * k // span)[None]
    return episodes


class Times:
    """Wall and process-CPU seconds of repeated runs of one variant."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def best(self, kind: str = "cpu") -> float:
        # The least disturbed run: on a shared machine interference only ever adds time.
        return min(getattr(self, kind))

    def median(self, kind: str = "cpu") -> float:
        return statistics.median(getattr(self, kind))


def timed(fn: Callable[[], torch.Tensor], device: str, into: Times) -> torch.Tensor:
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    into.wall.append(time.perf_counter() - wall)
    into.cpu.append(time.process_time() - cpu)
    return value


def max_rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    held = reference != 0
    return ((value.double() - reference.double()).abs()[held] / reference.double().abs()[held]).max().item()


def reference_check(damping: float) -> dict:
    """The benchmark's exact reference against the library's literal eq. 4 (explicit g g^T + lambda I),
    on a model small enough for the explicit matrix: both must give the same numbers."""
    model = build("cpu", torch.float64, layers=2, hidden=16, vocab=64, seed=3)
    update = random_update(model, rank=4, scale=1e-2, seed=4)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    episodes = equal_episodes(ids, prompt=4, k=5)
    library = episode_penalties_exact(model, update, ids, mask, episodes, damping)
    ours = episode_penalties_by_gradients(model, update, ids, mask, episodes, damping)
    size = sum(update.shape(n).numel() for n in update.names)
    return {"proxy_weights": size, "max_rel_err_vs_episode_penalties_exact": max_rel_err(ours, library)}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(variant: str, seq: int, logit_chunk: int) -> dict:
    """One variant in this process: peak RSS minus RSS after the model is loaded, in MiB."""
    torch.set_num_threads(1)
    model = build("cpu", torch.float32, **MEMORY_MODEL)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MEMORY_MODEL["vocab"], (1, seq), generator=gen)
    mask = torch.ones_like(ids)
    episodes = equal_episodes(ids, seq // 8, 16)
    update = random_update(model, 8, 1e-3, 2) if variant != "logprob_forward" else None
    gc.collect()
    # Reset the peak (VmHWM) to the current RSS: the peak of building the model is not the variant's.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    if variant == "logprob_forward":
        full_vocab_logprobs(model, ids, mask)
    else:
        episode_penalties(model, update, ids, mask, episodes, method=variant, logit_chunk=logit_chunk)
    return {
        "variant": variant,
        "seq": seq,
        "peak_over_loaded_mib": (_rss_kib("VmHWM") - base) / 1024,
        "wall_s": time.perf_counter() - start,
    }


def memory_main(args: argparse.Namespace) -> None:
    import subprocess

    load_start = load()
    variants = ["logprob_forward", *args.methods.split(",")]
    rows = []
    for seq in (int(x) for x in args.memory_seqs.split(",")):
        for variant in variants:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", variant, "--seq", str(seq)]
                + ["--logit-chunk", str(args.logit_chunk)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    base = {r["seq"]: r["peak_over_loaded_mib"] for r in rows if r["variant"] == "logprob_forward"}
    for r in rows:
        r["over_logprob_forward"] = r["peak_over_loaded_mib"] / base[r["seq"]]
    worst = max(r["over_logprob_forward"] for r in rows if r["variant"] != "logprob_forward")
    result = {
        "command": "python benchmarks/penalty.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_model(),
        "load_avg_start": load_start,
        "load_avg_end": load(),
        "model": MEMORY_MODEL,
        "batch": 1,
        "logit_chunk": args.logit_chunk,
        "estimator": "per variant, own process: peak RSS (VmHWM, reset after loading) minus RSS after load",
        "rows": rows,
        "targets": {
            "penalty peak <= 1.5x log-prob forward peak": verdict(worst <= TARGET_MEMORY_OVER_FORWARD)
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    print("\n| T | variant | peak - loaded (MiB) | / log-prob forward | wall (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq']} | {r['variant']} | {r['peak_over_loaded_mib']:.0f} | "
            f"{r['over_logprob_forward']:.2f}x | {r['wall_s']:.1f} |"
        )


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="repeats of the scaling phase")
    parser.add_argument("--exact-repeats", type=int, default=2, help="repeats of the exact-reference phase")
    parser.add_argument("--ks", default="1,4,16,64")
    parser.add_argument("--methods", default="forward_ad,reverse", help="fast-path methods to time")
    parser.add_argument("--memory", action="store_true", help="peak-memory comparison instead of timing")
    parser.add_argument("--memory-seqs", default="4096,8192")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--logit-chunk", type=int, default=1024)
    parser.add_argument("--damping", type=float, default=1e-5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (CPU); 1 by default: on a shared, oversubscribed machine two OpenMP "
        "threads wait for each other at every barrier, which makes wall times 5-20x longer and erratic",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.seq, args.logit_chunk)))
        return
    if args.memory:
        memory_main(args)
        return
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    load_start = load()
    dtype = getattr(torch, args.dtype)
    ks = [int(x) for x in args.ks.split(",")]
    methods = args.methods.split(",")

    check = reference_check(args.damping)
    model = build(args.device, dtype, args.layers, args.hidden, args.vocab)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    prompt = args.seq // 8
    episodes = {k: equal_episodes(ids, prompt, k) for k in ks}

    # dW_r is rebuilt (an SVD of each proxy matrix) once per training step: part of the penalty's cost,
    # paid once per step, not per micro-batch.
    svd = Times()
    update = None
    for _ in range(3):
        update = timed(lambda: random_update(model, 8, 1e-3, 2), args.device, svd)

    def fast(k: int, method: str) -> Callable[[], torch.Tensor]:
        return lambda: episode_penalties(model, update, ids, mask, episodes[k], args.damping, method=method)

    def exact(k: int) -> Callable[[], torch.Tensor]:
        return lambda: episode_penalties_by_gradients(model, update, ids, mask, episodes[k], args.damping)

    # Warm-up: first calls pay allocator growth and kernel selection.
    full_vocab_logprobs(model, ids, mask)
    for method in methods:
        fast(ks[0], method)()
    exact(ks[0])()

    # Phase 1: scaling in K and cost against one log-prob forward, round-robin in every repeat; the order
    # flips on odd repeats so that no variant always runs right after the same neighbour.
    fwd = Times()
    fast_t = {(k, m): Times() for k in ks for m in methods}
    jobs = [(k, m) for k in ks for m in methods]
    for r in range(args.repeats):
        timed(lambda: full_vocab_logprobs(model, ids, mask), args.device, fwd)
        for k, m in jobs if r % 2 == 0 else jobs[::-1]:
            timed(fast(k, m), args.device, fast_t[(k, m)])
        timed(lambda: full_vocab_logprobs(model, ids, mask), args.device, fwd)

    # Phase 2: the exact reference, each repeat right after a forward_ad run of the same K.
    rows = []
    for k in ks:
        paired, ref = Times(), Times()
        exact_value = None
        for _ in range(args.exact_repeats):
            timed(fast(k, "forward_ad"), args.device, paired)
            exact_value = timed(exact(k), args.device, ref)
        row = {
            "K": k,
            "episodes_in_batch": args.batch * k,
            "exact_cpu_s": ref.best(),
            "exact_wall_s": ref.best("wall"),
            "forward_ad_paired_cpu_s": paired.best(),
            "speedup_vs_exact": ref.best() / paired.best(),
            "speedup_vs_exact_wall": ref.best("wall") / paired.best("wall"),
        }
        for m in methods:
            values = fast(k, m)()
            t = fast_t[(k, m)]
            row[f"{m}_cpu_s"] = t.best()
            row[f"{m}_wall_s"] = t.best("wall")
            row[f"{m}_median_cpu_s"] = t.median()
            row[f"{m}_over_forward"] = t.best() / fwd.best()
            row[f"{m}_over_forward_wall"] = t.best("wall") / fwd.best("wall")
            row[f"{m}_max_rel_err"] = max_rel_err(values, exact_value)
        rows.append(row)
    for m in methods:
        base, base_wall = rows[0][f"{m}_cpu_s"], rows[0][f"{m}_wall_s"]
        for row in rows:
            row[f"{m}_vs_K1"] = row[f"{m}_cpu_s"] / base
            row[f"{m}_vs_K1_wall"] = row[f"{m}_wall_s"] / base_wall

    by_k = {row["K"]: row for row in rows}
    targets = {}
    if 16 in by_k:
        speedup = by_k[16]["speedup_vs_exact"]
        targets["exact/forward_ad at K=16 >= 10"] = verdict(speedup >= TARGET_SPEEDUP_K16)
    if args.dtype == "float32":
        worst = max(row[f"{m}_max_rel_err"] for row in rows for m in methods)
        targets["max rel err <= 1e-3"] = verdict(worst <= TARGET_MAX_REL_ERR)
    if 64 in by_k and ks[0] == 1:
        for m in methods:
            scaling = by_k[64][f"{m}_vs_K1"]
            targets[f"{m} time(K=64)/time(K=1) <= 1.3"] = verdict(scaling <= TARGET_K64_OVER_K1)
    for m in methods:
        targets[f"{m} / log-prob forward <= 3 (every K)"] = verdict(
            max(row[f"{m}_over_forward"] for row in rows) <= TARGET_OVER_FORWARD
        )
    result = {
        "command": "python benchmarks/penalty.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_model() if args.device == "cpu" else torch.cuda.get_device_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": load_start,
        "load_avg_end": load(),
        "device": args.device,
        "dtype": args.dtype,
        "model": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab},
        "proxy_weights": sum(update.shape(n).numel() for n in update.names),
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "exact_repeats": args.exact_repeats,
        "estimator": "min over repeats of process CPU time (wall-clock mins alongside)",
        "reference_check": check,
        "svd_cpu_s": svd.best(),
        "svd_over_forward": svd.best() / fwd.best(),
        "logprob_forward_cpu_s": fwd.best(),
        "logprob_forward_wall_s": fwd.best("wall"),
        "rows": rows,
        "targets": targets,
        "wall_s": time.perf_counter() - wall_start,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")

    cols = " | ".join(f"{m} (s) | {m}/fwd | {m} K/K1 | {m} err" for m in methods)
    print(f"\nCPU seconds, best of repeats. log-prob forward {fwd.best():.4f} s, SVD {svd.best():.4f} s")
    print(f"| K | exact (s) | forward_ad paired (s) | exact/forward_ad (wall) | {cols} |")
    print("|---" * (4 + 4 * len(methods)) + "|")
    for r in rows:
        cells = " | ".join(
            f"{r[f'{m}_cpu_s']:.4f} | {r[f'{m}_over_forward']:.2f}x | {r[f'{m}_vs_K1']:.2f} | "
            f"{r[f'{m}_max_rel_err']:.1e}"
            for m in methods
        )
        print(
            f"| {r['K']} | {r['exact_cpu_s']:.3f} | {r['forward_ad_paired_cpu_s']:.4f} | "
            f"{r['speedup_vs_exact']:.1f}x ({r['speedup_vs_exact_wall']:.1f}x) | {cells} |"
        )
    print(f"\ntargets: {json.dumps(targets, indent=1)}")


if __name__ == "__main__":
    main()
