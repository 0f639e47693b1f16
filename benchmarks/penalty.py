"""Benchmark the compression penalty (spec 3): fast path against the exact per-episode gradients.

    python benchmarks/penalty.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3]

Reports, on a random Qwen2 of 4 layers and hidden size 256, for K in {1, 4, 16, 64} episodes per
sample:
1. the time of ``episode_penalties`` (``forward_ad``, the actor's path) against the exact reference
   (one autograd backward per episode, then ``<dW_r, g_k>^2 + damping ||dW_r||^2``), their ratio,
   the maximum relative error, and time(K) / time(K=1) of the fast path;
2. the fast path's time against ONE log-prob forward over the same micro-batch.

All ratios come from the same run, timed alternately, so machine noise affects both sides alike.
The exact reference skips materialising ``g g^T + damping I`` (a 393k x 393k matrix here): the
quadratic form is computed from ``g_k`` directly, which is the same number; the explicit-matrix
version is checked against the fast path in tests/test_penalty.py on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from l2t_verl.penalty import LowRankUpdate, episode_penalties, last_layer_mlp_regex, select_proxy_params


def build(device: str, dtype: torch.dtype, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


def exact_penalties(model, update, ids, mask, episodes, damping) -> torch.Tensor:
    proxy = select_proxy_params(model, "|".join(update.names).replace(".", r"\."))
    dtheta = {n: update.dense(n).to(proxy[n].device, torch.float32) for n in update.names}
    reg = damping * update.sq_norm().float()
    k_max = int(episodes.max()) + 1
    out = torch.zeros(ids.shape[0], k_max, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    targets = episodes[:, 1:]
    for b in range(ids.shape[0]):
        for k in range(k_max):
            sel = targets[b] == k
            if not sel.any():
                continue
            grads = torch.autograd.grad(
                logp[b][sel].sum(), [proxy[n] for n in update.names], retain_graph=True
            )
            inner = sum((g.float() * dtheta[n]).sum() for g, n in zip(grads, update.names, strict=True))
            out[b, k] = inner.square() + reg
    return out


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", default="1,4,16,64")
    parser.add_argument("--damping", type=float, default=1e-5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args.device, dtype)
    regex = last_layer_mlp_regex(model)
    gen = torch.Generator().manual_seed(1)
    reference = {
        n: p.detach() - 1e-3 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        for n, p in select_proxy_params(model, regex).items()
    }
    update = LowRankUpdate.from_weights(model, reference, modules=regex, rank=8)
    ids = torch.randint(0, 2048, (args.batch, args.seq), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    prompt = args.seq // 8

    rows = []
    for k in [int(x) for x in args.ks.split(",")]:
        episodes = torch.full_like(ids, -1)
        span = args.seq - prompt
        episodes[:, prompt:] = (torch.arange(span, device=ids.device) * k // span)[None]
        fast_t, exact_t, fwd_t = [], [], []
        fast = exact = None
        for _ in range(args.repeats):
            t, fast = timed(
                partial(
                    episode_penalties, model, update, ids, mask, episodes, args.damping, method="forward_ad"
                ),
                args.device,
            )
            fast_t.append(t)
            with torch.no_grad():
                t, _ = timed(
                    lambda: torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1),
                    args.device,
                )
            fwd_t.append(t)
            t, exact = timed(
                partial(exact_penalties, model, update, ids, mask, episodes, args.damping), args.device
            )
            exact_t.append(t)
        held = exact != 0
        err = ((fast.float() - exact).abs()[held] / exact.abs()[held]).max().item()
        rows.append(
            {
                "K": k,
                "fast_s": statistics.median(fast_t),
                "exact_s": statistics.median(exact_t),
                "logprob_forward_s": statistics.median(fwd_t),
                "speedup_vs_exact": statistics.median(exact_t) / statistics.median(fast_t),
                "overhead_vs_forward": statistics.median(fast_t) / statistics.median(fwd_t),
                "max_rel_err": err,
            }
        )
    base = rows[0]["fast_s"]
    for row in rows:
        row["fast_time_vs_K1"] = row["fast_s"] / base
    print(
        json.dumps(
            {
                "device": args.device,
                "dtype": args.dtype,
                "batch": args.batch,
                "seq": args.seq,
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
            indent=2,
        )
    )
    print("\n| K | fast (s) | exact (s) | exact/fast | fast/forward | fast(K)/fast(1) | max rel err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['K']} | {r['fast_s']:.3f} | {r['exact_s']:.3f} | {r['speedup_vs_exact']:.1f}x | "
            f"{r['overhead_vs_forward']:.2f}x | {r['fast_time_vs_K1']:.2f} | {r['max_rel_err']:.2e} |"
        )


if __name__ == "__main__":
    main()
