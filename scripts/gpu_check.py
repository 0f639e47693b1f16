#!/usr/bin/env python
"""One-command GPU check of the compression penalty and the `hf` rollout engine (no vLLM, no Ray).

    PYTHONPATH=. python scripts/gpu_check.py [--out FILE] [--budget-s 220] [--tiny]

On a random model with Qwen2-1.5B's shape (hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960,
vocabulary 151,936, tied embeddings; fp32 weights and a bf16 copy), proxy P = the last layer's MLP,
a rank-8 update of a random step, damping 1e-5:

- ``accuracy``: ``episode_penalties`` (``forward_ad`` and ``reverse``; fp32 and bf16; sdpa and, where
  flash_attn is installed, flash_attention_2) against the fp32 exact reference on 1 sample x 256
  tokens, 4 episodes. The reference is one autograd backward per episode for ``g_k``, then
  ``<dW_r, g_k>^2 + lambda ||dW_r||^2``: ``episode_penalties_exact`` without its explicit
  ``g g^T + lambda I`` matrix (41M x 41M here), as in benchmarks/penalty.py.
- ``hf_engine``: ``l2t_verl.local.hf_engine.HFEngine`` (the `hf` rollout backend's compute core)
  generates from and scores token-id prompts on the device; scores must be finite and agree with the
  log-probs of generation.
- ``perf/<dtype>/<attn>/T<T>``: one log-prob forward (HF forward, full-vocabulary log_softmax, gather:
  what verl's ``compute_log_prob`` does) and each penalty method on the same batch (1 x T tokens,
  prompt T/8, 16 episodes): best-of-repeats wall time, penalty / forward, and peak GPU memory
  (``torch.cuda.max_memory_allocated``, reset before each measurement; ``extra_gib`` is the peak
  above what was allocated before the call, i.e. above the resident weights).

- ``megatron`` (where megatron-core is installed): a random fp32 megatron-core GPT (hidden 1024, 4
  layers, 16 heads / 4 query groups, MLP 2816, vocabulary 32,768; Transformer Engine's layer spec
  where it is installed, else the local spec), a rank-8 update of the last layer's MLP in HF names,
  4 right-padded samples of 320-512 tokens with 4 episodes each. ``megatron_episode_penalties``
  (reverse mode, damping 0, megatron-core's own forward-only pipeline schedule) against central finite
  differences of each episode's log-likelihood along ``dW_r`` in fp32 (and fp64), taken on a
  local-spec model with the same weights (Transformer Engine runs fp32 GEMMs in TF32). Pass: no
  penalty off by more than 1e-2 relative (denominators floored at 1% of the largest).
  ``transformer_engine_path`` stays "unverified" unless the Transformer Engine model passed. Then
  ``fp32_master_weights`` on a bf16 copy under megatron-core's ``DistributedOptimizer``: fallbacks,
  |master - bf16| before and after one Adam step (lr 1e-6), how many masters and bf16 weights moved.
  Runs in its own one-process torch.distributed world, torn down afterwards.

Every section is guarded: an exception or OOM is recorded with its message and the script goes on.
Once ``--budget-s`` seconds have passed, the remaining sections (and timing repeats) are skipped and
recorded as such. The JSON is rewritten after every section, so a run killed from outside leaves
what it had measured. ``--tiny`` runs the same code on the CPU with a tiny shape (the CI smoke test;
``megatron`` there uses the local spec, a one-stage schedule, and skips the optimizer, which needs
CUDA). Needs only torch + transformers + this repository (+ megatron-core for ``megatron``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # `python scripts/gpu_check.py` puts scripts/ on sys.path, not the repository root.
    sys.path.insert(0, str(REPO))

GIB = float(1 << 30)
HEAVY_MODULES = ("verl", "ray", "vllm")
DAMPING = 1e-5
RANK = 8
UPDATE_SCALE = 1e-3
ACC_TOKENS, ACC_PROMPT, ACC_EPISODES = 256, 32, 4
PERF_EPISODES = 16
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ATTENTIONS = ("sdpa", "flash_attention_2")
METHODS = ("forward_ad", "reverse")
STATUSES = ("ok", "skipped", "error", "oom")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq_lens: tuple[int, ...]
    max_positions: int


QWEN2_1_5B = Shape(1536, 28, 12, 2, 8960, 151936, (8192, 16384), 32768)
TINY = Shape(64, 2, 4, 2, 128, 512, (128, 256), 1024)


class Skip(Exception):
    """A section or measurement that does not apply here (recorded as ``skipped``, not ``error``)."""


def _oom_types() -> tuple[type[BaseException], ...]:
    return tuple({getattr(torch, "OutOfMemoryError", MemoryError), torch.cuda.OutOfMemoryError, MemoryError})


def failure(err: BaseException) -> dict[str, Any]:
    """JSON record of an exception: ``skipped`` for :class:`Skip`, ``oom`` for out-of-memory errors."""
    if isinstance(err, Skip):
        return {"status": "skipped", "reason": str(err)}
    text = f"{type(err).__name__}: {err}"
    oom = isinstance(err, _oom_types()) or "out of memory" in str(err).lower()
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"status": "oom" if oom else "error", "error": text[:2000], "traceback": tb[-2500:]}


def unsupported(err: BaseException) -> bool:
    """The installed l2t_verl.penalty predates ``method="reverse"`` or ``logit_chunk``."""
    text = str(err)
    return (isinstance(err, TypeError) and "logit_chunk" in text) or (
        isinstance(err, ValueError) and "unknown penalty method" in text
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Check:
    """The run: its settings, the shared objects (models, update) and the JSON being written."""

    def __init__(self, args: argparse.Namespace, out: Path, shape: Shape, device: torch.device) -> None:
        self.args = args
        self.out = out
        self.shape = shape
        self.device = device
        self.start = time.perf_counter()
        self.models: dict[str, torch.nn.Module] = {}
        self.update: Any = None
        self.penalty: Any = None
        self.penalty_error: str | None = None
        try:
            self.penalty = importlib.import_module("l2t_verl.penalty")
        except Exception as err:  # recorded in every section that needs it
            self.penalty_error = f"{type(err).__name__}: {err}"
        self.result: dict[str, Any] = {
            "script": "scripts/gpu_check.py",
            "argv": sys.argv[1:],
            "mode": "tiny" if args.tiny else "full",
            "device": str(device),
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": args.budget_s,
            "shape": asdict(shape),
            "settings": {
                "damping": DAMPING,
                "rank": RANK,
                "update_scale": UPDATE_SCALE,
                "proxy": "last decoder layer's MLP (last_layer_mlp_regex)",
                "accuracy_batch": {"samples": 1, "tokens": ACC_TOKENS, "prompt": ACC_PROMPT},
                "accuracy_episodes": ACC_EPISODES,
                "perf_batch": "1 x T tokens, prompt T/8",
                "perf_episodes": PERF_EPISODES,
                "repeats": args.repeats,
                "logit_chunk": args.logit_chunk,
                "timing": "wall seconds, device synchronised, best of repeats after one warm-up call",
            },
            "sections": {},
            "finished": False,
        }
        self.sections: dict[str, Any] = self.result["sections"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def budget_reason(self) -> str:
        return f"time budget of {self.args.budget_s:g} s used up ({self.elapsed():.0f} s elapsed)"

    def need_penalty(self) -> Any:
        if self.penalty is None:
            raise RuntimeError(f"l2t_verl.penalty failed to import: {self.penalty_error}")
        return self.penalty

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one section, record its figures or its failure, and rewrite the JSON."""
        if self.over_budget():
            self.sections[name] = {"status": "skipped", "reason": self.budget_reason()}
            self.save()
            return
        began = time.perf_counter()
        print(f"[{self.elapsed():6.1f}s] {name} ...", flush=True)
        try:
            record = {"status": "ok", **fn()}
        except Exception as err:
            record = failure(err)
        record["wall_s"] = round(time.perf_counter() - began, 3)
        self.sections[name] = record
        free_memory()
        print(f"[{self.elapsed():6.1f}s] {name}: {record['status']}", flush=True)
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        tmp.replace(self.out)


# --------------------------------------------------------------------------------------------------
# Model, update, batches


def build_model(shape: Shape, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Random fp32 Qwen2 of ``shape`` in eval mode, initialised directly on ``device``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        use_cache=False,
    )
    torch.manual_seed(seed)
    # Initialising 1.5B weights on the CPU and copying them over would cost more than the checks.
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.eval()


def random_update(model: torch.nn.Module, penalty: Any, seed: int = 2) -> Any:
    """``dW_r`` of a random step ``W_ref = W - scale * N(0, 1)`` on the last layer's MLP."""
    regex = penalty.last_layer_mlp_regex(model)
    proxy = penalty.select_proxy_params(model, regex)
    device = next(iter(proxy.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    reference = {
        n: p.detach() - UPDATE_SCALE * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
        for n, p in proxy.items()
    }
    return penalty.LowRankUpdate.from_weights(model, reference, modules=regex, rank=RANK)


def equal_episodes(ids: torch.Tensor, prompt: int, k: int) -> torch.Tensor:
    """-1 on the prompt, then ``k`` episodes of (nearly) equal length."""
    episodes = torch.full_like(ids, -1)
    span = ids.shape[1] - prompt
    episodes[:, prompt:] = (torch.arange(span, device=ids.device) * k // span)[None]
    return episodes


def random_batch(
    vocab: int, tokens: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
    return ids, torch.ones_like(ids)


@contextmanager
def attention(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Run ``model`` with another attention implementation, then put the old one back."""
    before = model.config._attn_implementation
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if implementation != before:
            if callable(setter):
                setter(implementation)
            else:
                model.config._attn_implementation = implementation
        yield
    finally:
        if model.config._attn_implementation != before:
            if callable(setter):
                setter(before)
            else:
                model.config._attn_implementation = before


def attention_unavailable(dtype_name: str, implementation: str) -> str | None:
    if implementation != "flash_attention_2":
        return None
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    if dtype_name == "fp32":
        return "flash_attention_2 runs in fp16/bf16 only"
    return None


def max_rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    held = reference != 0
    diff = (value.double().cpu() - reference.double().cpu()).abs()[held.cpu()]
    return float((diff / reference.double().cpu().abs()[held.cpu()]).max())


# --------------------------------------------------------------------------------------------------
# Measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(check: Check, fn: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """One warm-up call, then up to ``--repeats`` timed calls (fewer once the budget is spent).

    Peak memory covers all calls; ``extra_gib`` is the peak above what was allocated before them."""
    device = check.device
    cuda = device.type == "cuda"
    free_memory()
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    began = time.perf_counter()
    value = fn()
    sync(device)
    record: dict[str, Any] = {"warmup_s": round(time.perf_counter() - began, 4)}
    times = []
    for _ in range(check.args.repeats):
        if check.over_budget():
            record["repeats_cut"] = check.budget_reason()
            break
        del value
        began = time.perf_counter()
        value = fn()
        sync(device)
        times.append(time.perf_counter() - began)
    record["times_s"] = [round(t, 4) for t in times]
    record["best_s"] = round(min(times), 4) if times else record["warmup_s"]
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        record.update(
            peak_gib=round(peak / GIB, 3),
            baseline_gib=round(base / GIB, 3),
            extra_gib=round((peak - base) / GIB, 3),
        )
    else:
        record.update(peak_gib=None, baseline_gib=None, extra_gib=None)
    return record, value


def attempt(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A measurement inside a section, guarded like a section: an OOM in one method keeps the others."""
    try:
        return {"status": "ok", **fn()}
    except Exception as err:
        record = failure(err)
        if unsupported(err):
            reason = "not supported by this l2t_verl.penalty"
            record = {"status": "skipped", "reason": reason, "error": record["error"]}
    # Outside the except clause: until it ends, the exception's frames keep the failed call's tensors.
    free_memory()
    return record


def penalty_call(
    check: Check,
    model: torch.nn.Module,
    method: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    episodes: torch.Tensor,
) -> torch.Tensor:
    penalty = check.need_penalty()
    return penalty.episode_penalties(
        model, check.update, ids, mask, episodes, DAMPING, method=method, logit_chunk=check.args.logit_chunk
    )


# --------------------------------------------------------------------------------------------------
# Sections


def section_environment(check: Check) -> dict[str, Any]:
    imported, failed = [], {}
    for name in ("l2t_verl.penalty", "l2t_verl.local.hf_engine"):
        try:
            importlib.import_module(name)
            imported.append(name)
        except Exception as err:
            failed[name] = f"{type(err).__name__}: {err}"
    # Everything this process imported so far, the penalty module included (loaded by Check).
    heavy = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in HEAVY_MODULES})
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "flash_attn": None,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "imported": imported,
        "import_errors": failed,
        "heavy_imports": heavy,
        "penalty_signature": None,
        "git_head": None,
    }
    if importlib.util.find_spec("flash_attn") is not None:
        try:
            env["flash_attn"] = importlib.import_module("flash_attn").__version__
        except Exception as err:
            env["flash_attn"] = f"import failed: {type(err).__name__}: {err}"
    if check.device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(check.device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    if check.penalty is not None:
        env["penalty_signature"] = str(inspect.signature(check.penalty.episode_penalties))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            env["git_head"] = head.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def section_build(check: Check) -> dict[str, Any]:
    penalty = check.need_penalty()
    began = time.perf_counter()
    fp32 = build_model(check.shape, check.device)
    sync(check.device)
    built = time.perf_counter() - began
    check.models["fp32"] = fp32
    check.models["bf16"] = copy.deepcopy(fp32).to(torch.bfloat16)
    tied = fp32.get_output_embeddings().weight is fp32.get_input_embeddings().weight
    began = time.perf_counter()
    check.update = random_update(fp32, penalty)
    sync(check.device)
    record = {
        "parameters": sum(p.numel() for p in fp32.parameters()),
        "tied_embeddings": tied,
        "build_fp32_s": round(built, 3),
        "update_s": round(time.perf_counter() - began, 3),
        "proxy": list(check.update.names),
        "proxy_weights": sum(math.prod(check.update.shape(n)) for n in check.update.names),
        "update_sq_norm": float(check.update.sq_norm()),
    }
    if check.device.type == "cuda":
        record["allocated_gib"] = round(torch.cuda.memory_allocated(check.device) / GIB, 3)
    return record


def section_accuracy(check: Check) -> dict[str, Any]:
    if not check.models:
        raise RuntimeError("no model: the build section failed")
    ids, mask = random_batch(check.shape.vocab, ACC_TOKENS, check.device, seed=1)
    episodes = equal_episodes(ids, ACC_PROMPT, ACC_EPISODES)
    with attention(check.models["fp32"], "sdpa"):
        reference = check.need_penalty().episode_penalties_by_gradients(
            check.models["fp32"], check.update, ids, mask, episodes, DAMPING
        )
    # The bf16 model's weights are the fp32 ones rounded; the exact penalty of those rounded weights
    # (in fp32) separates what the rounding moves from what bf16 arithmetic adds.
    rounded = copy.deepcopy(check.models["bf16"]).float()
    with attention(rounded, "sdpa"):
        reference_rounded = check.need_penalty().episode_penalties_by_gradients(
            rounded, check.update, ids, mask, episodes, DAMPING
        )
    del rounded
    free_memory()
    reg = DAMPING * float(check.update.sq_norm())
    variants: dict[str, Any] = {}
    for dtype_name in DTYPES:
        model = check.models[dtype_name]
        for impl in ATTENTIONS:
            for method in METHODS:
                key = f"{dtype_name}/{impl}/{method}"
                why = attention_unavailable(dtype_name, impl)
                if why is not None:
                    variants[key] = {"status": "skipped", "reason": why}
                    continue
                if check.over_budget():
                    variants[key] = {"status": "skipped", "reason": check.budget_reason()}
                    continue

                def one(model=model, impl=impl, method=method) -> dict[str, Any]:
                    with attention(model, impl):
                        value = penalty_call(check, model, method, ids, mask, episodes)
                    return {
                        "penalties": [float(x) for x in value.flatten()],
                        "all_finite": bool(torch.isfinite(value).all()),
                        "max_rel_err": max_rel_err(value, reference),
                        # The damping term is the same exact number on both sides; without it the
                        # error of <dW_r, g_k>^2 itself shows.
                        "inner_sq_max_rel_err": max_rel_err(value - reg, reference - reg),
                        "max_rel_err_vs_exact_of_bf16_weights": max_rel_err(value, reference_rounded),
                    }

                variants[key] = attempt(one)
    return {
        "reference": [float(x) for x in reference.flatten()],
        "reference_of_bf16_weights": [float(x) for x in reference_rounded.flatten()],
        "bf16_weights_reference_max_rel_err": max_rel_err(reference_rounded, reference),
        "reference_damping_term": reg,
        "damping_share_of_reference": reg / float(reference.mean()),
        "variants": variants,
    }


def section_hf_engine(check: Check) -> dict[str, Any]:
    if not check.models:
        raise RuntimeError("no model: the build section failed")
    from l2t_verl.local.hf_engine import HFEngine, SamplingSpec

    # The `hf` server loads its model in fp32 (hf_server.launch_server).
    model = check.models["fp32"]
    vocab = check.shape.vocab
    gen = torch.Generator().manual_seed(7)
    # Two prompt lengths: the batch is left-padded, as in the server's batched decode.
    prompts = [torch.randint(1, vocab - 1, (n,), generator=gen).tolist() for n in (12, 7)]
    max_tokens = 8

    def engine() -> Any:
        return HFEngine(model, eos_token_ids=[vocab - 1], pad_token_id=0, max_model_len=64, max_batch_size=8)

    def run_mode() -> dict[str, Any]:
        steps: dict[str, Any] = {}
        eng = engine()
        greedy: list = []

        def generate_greedy() -> dict[str, Any]:
            spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0, logprobs=True, ignore_eos=True)
            out = eng.generate([(p, spec) for p in prompts])
            greedy.extend(c[0] for c in out)
            logps = [lp for c in greedy for lp in c.log_probs]
            return {"tokens": [c.token_ids for c in greedy], "all_finite": all(map(math.isfinite, logps))}

        def generate_sampled() -> dict[str, Any]:
            spec = SamplingSpec(
                max_tokens=max_tokens, temperature=1.0, top_p=0.9, logprobs=True, ignore_eos=True, seed=3, n=2
            )
            out = eng.generate([(prompts[0], spec)])[0]
            logps = [lp for c in out for lp in c.log_probs]
            return {"tokens": [c.token_ids for c in out], "all_finite": all(map(math.isfinite, logps))}

        def scores(fresh: bool) -> dict[str, Any]:
            if not greedy:
                raise Skip("greedy generation failed")
            scorer = engine() if fresh else eng
            diffs, finite, reused = [], True, []
            for prompt, completion in zip(prompts, greedy, strict=True):
                logps, cached = scorer.score(prompt + completion.token_ids)
                reused.append(cached)
                finite = finite and all(map(math.isfinite, logps))
                response = logps[len(prompt) - 1 :]
                diffs += [abs(a - b) for a, b in zip(response, completion.log_probs, strict=True)]
            return {
                "all_finite": finite,
                "reused_tokens": reused,
                "max_abs_diff_vs_generate_logprobs": max(diffs),
            }

        steps["generate_greedy"] = attempt(generate_greedy)
        steps["generate_sampled"] = attempt(generate_sampled)
        steps["score_prefix_cached"] = attempt(lambda: scores(fresh=False))
        steps["score_fresh"] = attempt(lambda: scores(fresh=True))
        return steps

    modes: dict[str, Any] = {"as_is": run_mode()}
    if check.device.type != "cpu" and any(s["status"] != "ok" for s in modes["as_is"].values()):
        # The engine builds its input tensors without a device; with the device as torch's default
        # those land next to the model, which shows what else (if anything) stands in the way.
        with torch.device(check.device):
            modes["default_device"] = run_mode()
    working = [
        name
        for name, steps in modes.items()
        if all(steps[s]["status"] == "ok" for s in ("generate_greedy", "score_fresh"))
        and steps["score_fresh"]["all_finite"]
        and steps["generate_greedy"]["all_finite"]
    ]
    record: dict[str, Any] = {
        "prompts": prompts,
        "modes": modes,
        "working_modes": working,
        "as_is_works": "as_is" in working,
    }
    record["scores_finite"] = bool(working)
    if not working:
        first = next(
            (s for steps in modes.values() for s in steps.values() if s["status"] != "ok"), {"error": "?"}
        )
        record["status"] = "error"
        record["error"] = (
            "generate + score did not run with finite scores in any mode; first failure: "
            + str(first.get("error", first.get("reason")))
        )
    return record


def megatron_helpers() -> Any:
    """scripts/gpu_check_megatron.py, loaded by its path (this script is run from anywhere, and tests load
    it by path too)."""
    name = "gpu_check_megatron"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def section_megatron(check: Check) -> dict[str, Any]:
    try:
        mcore = importlib.import_module("megatron.core")
    except Exception as err:
        raise Skip(f"megatron.core is not importable ({type(err).__name__}: {err})") from None
    from l2t_verl.penalty.megatron import megatron_episode_penalties, megatron_schedule
    from l2t_verl.penalty.megatron_layout import megatron_proxy_names

    mg = megatron_helpers()
    device = check.device
    cuda = device.type == "cuda"
    shape = mg.MEGATRON_TINY if check.args.tiny else mg.MEGATRON_FULL
    te_version = mg.transformer_engine_version()
    spec = "transformer_engine" if cuda and te_version is not None else "local"
    record: dict[str, Any] = {
        "megatron_core": getattr(mcore, "__version__", None),
        "transformer_engine": te_version,
        "spec": spec,
        "shape": asdict(shape),
        # On the CPU megatron-core's own schedule cannot run (it creates CUDA tensors).
        "schedule": "megatron_schedule" if cuda else "one-stage CPU schedule",
        "rank": RANK,
        "damping": 0.0,
        "tolerance": mg.FD_TOLERANCE,
        "error_floor": mg.ERROR_FLOOR,
    }
    with mg.megatron_runtime(device):
        model, record["build_s"] = mg.timed(device, lambda: mg.build_gpt(shape, device, spec))
        models = {spec: model}
        if spec == "transformer_engine":
            # The finite-difference reference runs on a local-spec twin: Transformer Engine computes fp32
            # GEMMs in TF32 (see gpu_check_megatron's docstring).
            models["local"] = mg.local_twin(model, shape, device)
        reference_model = models["local"]
        names = megatron_proxy_names(shape.layers)
        update = mg.random_update(model, names, RANK, UPDATE_SCALE)
        ids, mask, episodes = mg.episode_batch(shape, device)
        k_max = shape.episodes
        schedule = megatron_schedule if cuda else mg.one_stage_schedule
        record.update(
            parameters=sum(p.numel() for p in model.parameters()),
            proxy=names,
            update_sq_norm=float(update.sq_norm()),
            tokens=int(mask.sum()),
            episodes_scored=int(mg.episode_exists(mask, episodes, k_max).sum()),
        )

        reverse: dict[str, torch.Tensor] = {}
        record["reverse"] = {}
        for name, chunk in models.items():

            def run_reverse(name: str = name, chunk: torch.nn.Module = chunk) -> dict[str, Any]:
                value, seconds = mg.timed(
                    device,
                    lambda: megatron_episode_penalties(
                        [chunk], update, ids, mask, episodes, 0.0, k_max=k_max, schedule=schedule
                    ),
                )
                reverse[name] = value
                return {
                    "seconds": seconds,
                    "penalties": [float(x) for x in value.flatten()],
                    "all_finite": bool(torch.isfinite(value).all()),
                    "grads_untouched": all(p.grad is None for p in chunk.parameters()),
                }

            record["reverse"][name] = attempt(run_reverse)

        references: dict[str, torch.Tensor] = {}
        record["finite_difference"] = {}
        for key, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
            if check.over_budget():
                record["finite_difference"][key] = {"status": "skipped", "reason": check.budget_reason()}
                continue

            def run_fd(key: str = key, dtype: torch.dtype = dtype) -> dict[str, Any]:
                with mg.in_dtype(reference_model, dtype):
                    (value, info), seconds = mg.timed(
                        device,
                        lambda: mg.finite_difference_penalties(
                            reference_model, update, names, ids, mask, episodes, k_max
                        ),
                    )
                references[key] = value
                return {"seconds": seconds, **info, "penalties": [float(x) for x in value.flatten()]}

            record["finite_difference"][key] = attempt(run_fd)

        pairs = {
            f"{name}_vs_fd_{key}": (value, reference)
            for name, value in reverse.items()
            for key, reference in references.items()
        }
        if "transformer_engine" in reverse and "local" in reverse:
            pairs["transformer_engine_vs_local"] = (reverse["transformer_engine"], reverse["local"])
        record["comparisons"] = {
            key: {
                "max_rel_err": max_rel_err(value, reference),
                "max_rel_err_floored": mg.floored_rel_err(value, reference, mg.ERROR_FLOOR),
            }
            for key, (value, reference) in pairs.items()
        }

        if not cuda:
            record["masters"] = {"status": "skipped", "reason": "megatron-core's optimizers need CUDA"}
        elif check.over_budget():
            record["masters"] = {"status": "skipped", "reason": check.budget_reason()}
        else:
            record["masters"] = attempt(lambda: mg.masters_check(model, shape, device, spec))

    passed, not_run = None, ""
    if spec in reverse and "fp32" in references:
        main = record["comparisons"][f"{spec}_vs_fd_fp32"]
        passed = main["max_rel_err_floored"] <= mg.FD_TOLERANCE
        record.update(
            reverse_vs_fd_fp32_max_rel_err=main["max_rel_err"],
            reverse_vs_fd_fp32_max_rel_err_floored=main["max_rel_err_floored"],
            passed=passed,
        )
    else:
        failed = [
            rec
            for rec in (record["reverse"].get(spec, {}), record["finite_difference"].get("fp32", {}))
            if rec.get("status") != "ok"
        ]
        first = failed[0] if failed else {"status": "error", "error": "?"}
        not_run = "reverse mode or the fp32 finite difference did not run: " + str(
            first.get("error", first.get("reason"))
        )
        if first["status"] == "skipped":
            record.update(status="skipped", reason=not_run)
        else:
            record.update(status="error", error=not_run)
    if spec in reverse and "fp64" in references:
        record["reverse_vs_fd_fp64_max_rel_err"] = max_rel_err(reverse[spec], references["fp64"])

    if spec != "transformer_engine":
        why = "transformer_engine is not importable" if te_version is None else "no CUDA device"
        record["transformer_engine_path"] = f"unverified ({why}; this run used the local spec)"
    elif passed:
        record["transformer_engine_path"] = "verified"
    elif passed is None:
        record["transformer_engine_path"] = f"unverified ({not_run[:200]})"
    else:
        record["transformer_engine_path"] = (
            f"unverified (reverse vs fp32 finite differences: max rel err (floored) "
            f"{record['reverse_vs_fd_fp32_max_rel_err_floored']:.1e} > {mg.FD_TOLERANCE:g})"
        )
    return record


def perf_cell(check: Check, dtype_name: str, impl: str, tokens: int) -> Callable[[], dict[str, Any]]:
    def cell() -> dict[str, Any]:
        why = attention_unavailable(dtype_name, impl)
        if why is not None:
            raise Skip(why)
        if not check.models:
            raise RuntimeError("no model: the build section failed")
        model = check.models[dtype_name]
        ids, mask = random_batch(check.shape.vocab, tokens, check.device, seed=tokens)
        episodes = equal_episodes(ids, tokens // 8, PERF_EPISODES)
        record: dict[str, Any] = {"tokens": tokens}
        with attention(model, impl):

            def forward() -> dict[str, Any]:
                timing, value = measure(
                    check, lambda: check.need_penalty().full_vocab_logprobs(model, ids, mask)
                )
                return {**timing, "all_finite": bool(torch.isfinite(value).all())}

            record["logprob_forward"] = attempt(forward)
            for method in METHODS:
                if check.over_budget():
                    record[method] = {"status": "skipped", "reason": check.budget_reason()}
                    continue

                def pen(method: str = method) -> dict[str, Any]:
                    timing, value = measure(
                        check, lambda: penalty_call(check, model, method, ids, mask, episodes)
                    )
                    return {**timing, "all_finite": bool(torch.isfinite(value).all())}

                record[method] = attempt(pen)
                fwd = record["logprob_forward"]
                if record[method]["status"] == "ok" and fwd["status"] == "ok":
                    record[method]["over_forward"] = round(record[method]["best_s"] / fwd["best_s"], 3)
        return record

    return cell


# --------------------------------------------------------------------------------------------------
# Summary


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(check: Check) -> str:
    lines = [
        "| dtype | attention | T | log-prob fwd (s) | fwd extra GiB | "
        + " | ".join(f"{m} (s) | {m} / fwd | {m} extra GiB" for m in METHODS)
        + " |",
        "|---" * (5 + 3 * len(METHODS)) + "|",
    ]
    for name, rec in check.sections.items():
        if not name.startswith("perf/"):
            continue
        _, dtype_name, impl, t = name.split("/")
        if rec["status"] != "ok":
            why = rec.get("reason") or rec.get("error", "")[:100]
            lines.append(f"| {dtype_name} | {impl} | {t[1:]} | {rec['status']}: {why} |")
            continue
        cells = []
        for key in ("logprob_forward", *METHODS):
            m = rec.get(key, {})
            if m.get("status") != "ok":
                cells.append(m.get("status", "-"))
                cells += ["-"] if key == "logprob_forward" else ["-", "-"]
                continue
            cells.append(_fmt(m["best_s"], ".3f"))
            if key != "logprob_forward":
                cells.append(_fmt(m.get("over_forward"), ".2f"))
            cells.append(_fmt(m["extra_gib"], ".2f"))
        lines.append(f"| {dtype_name} | {impl} | {t[1:]} | " + " | ".join(cells) + " |")
    acc = check.sections.get("accuracy", {})
    if acc.get("status") == "ok":
        lines += [
            "",
            f"exact penalty of the bf16-rounded weights vs fp32 weights: max rel err "
            f"{acc['bf16_weights_reference_max_rel_err']:.1e}; damping term "
            f"{acc['damping_share_of_reference']:.1%} of the mean reference penalty",
            "",
            "| variant | max rel err (penalty) | max rel err (<dW_r, g_k>^2) | vs exact of bf16 weights |",
            "|---|---|---|---|",
        ]
        for key, v in acc["variants"].items():
            if v["status"] == "ok":
                lines.append(
                    f"| {key} | {v['max_rel_err']:.1e} | {v['inner_sq_max_rel_err']:.1e} | "
                    f"{v['max_rel_err_vs_exact_of_bf16_weights']:.1e} |"
                )
            else:
                lines.append(f"| {key} | {v['status']} | | |")
    lines += megatron_summary(check.sections.get("megatron"))
    return "\n".join(lines)


def megatron_summary(rec: dict[str, Any] | None) -> list[str]:
    if rec is None:
        return []
    if rec["status"] != "ok" and "reverse" not in rec:
        why = rec.get("reason") or rec.get("error", "")[:200]
        return ["", f"megatron: {rec['status']}: {why}; Transformer Engine path: unverified"]
    passed = rec.get("passed")
    verdict = "-" if passed is None else ("pass" if passed else "FAIL")
    lines = [
        "",
        f"megatron ({rec['spec']} spec, {rec['schedule']}, {rec['episodes_scored']} episodes, "
        f"{rec['tokens']} tokens): reverse vs fp32 finite differences {verdict} at "
        f"{rec['tolerance']:g}; Transformer Engine path: {rec['transformer_engine_path']}",
        "",
        "| megatron reverse | s | vs fd fp32: max rel err | floored | vs fd fp64: max rel err | floored |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rec["reverse"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} | | | | |")
            continue
        cells = [_fmt(r["seconds"], ".3f")]
        for key in ("fp32", "fp64"):
            c = rec["comparisons"].get(f"{name}_vs_fd_{key}", {})
            cells += [_fmt(c.get("max_rel_err"), ".1e"), _fmt(c.get("max_rel_err_floored"), ".1e")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fd = [
        f"{key} {f['seconds']:.3f} s (h {f['step']:.1e})" if f["status"] == "ok" else f"{key} {f['status']}"
        for key, f in rec["finite_difference"].items()
    ]
    lines.append(f"finite differences: {', '.join(fd)}")
    twin = rec["comparisons"].get("transformer_engine_vs_local")
    if twin is not None:
        lines.append(
            f"Transformer Engine vs local-spec reverse mode (TF32 GEMMs vs fp32): max rel err "
            f"{twin['max_rel_err']:.1e}, floored {twin['max_rel_err_floored']:.1e}"
        )
    m = rec.get("masters", {})
    if m.get("status") == "ok":
        before, after = m["before_step"], m["after_step"]
        lines.append(
            f"masters: {m['fallbacks']} fallbacks; |master - bf16| {before['max_abs_master_minus_bf16']:.1e} "
            f"before and {after['max_abs_master_minus_bf16']:.1e} after one step "
            f"({after['beyond_bf16_rounding']} beyond bf16 rounding); the step moved "
            f"{m['masters_changed']} of {m['numel']} masters and {m['bf16_changed']} bf16 weights"
        )
    else:
        lines.append(f"masters: {m.get('status', '-')}: {m.get('reason') or m.get('error', '')[:200]}")
    return lines


# --------------------------------------------------------------------------------------------------


def default_out() -> Path:
    out_dir = os.environ.get("OUT")
    return Path(out_dir) / "gpu_check.json" if out_dir else Path("gpu_check.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default $OUT/gpu_check.json or ./)"
    )
    parser.add_argument("--budget-s", type=float, default=220.0, help="skip what remains after this many s")
    parser.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (CI smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up")
    parser.add_argument("--logit-chunk", type=int, default=1024, help="episode_penalties(logit_chunk=...)")
    parser.add_argument("--seq-lens", default=None, help="comma-separated T of the perf cells")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (--tiny: 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = TINY if args.tiny else QWEN2_1_5B
    if args.seq_lens:
        shape = Shape(**{**asdict(shape), "seq_lens": tuple(int(t) for t in args.seq_lens.split(","))})
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    threads = args.threads if args.threads is not None else (1 if args.tiny else None)
    if threads is not None:
        # On a small shared box two OpenMP threads wait for each other at every barrier.
        torch.set_num_threads(threads)
    check = Check(args, args.out or default_out(), shape, device)

    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("build", lambda: section_build(check)),
        ("accuracy", lambda: section_accuracy(check)),
        ("hf_engine", lambda: section_hf_engine(check)),
        # Before the perf cells: it tears its process group and Megatron state down again.
        ("megatron", lambda: section_megatron(check)),
    ]
    # bf16 (what the actor runs) before fp32 and the largest T last: when the budget runs out, what
    # is skipped is what was least likely to fit anyway.
    for tokens in shape.seq_lens:
        for dtype_name in DTYPES:
            for impl in ATTENTIONS:
                cell = perf_cell(check, dtype_name, impl, tokens)
                sections.append((f"perf/{dtype_name}/{impl}/T{tokens}", cell))

    check.run("environment", lambda: section_environment(check))
    no_device = device.type == "cuda" and not torch.cuda.is_available()
    if no_device or (device.type == "cpu" and not args.tiny):
        reason = "no CUDA device" if no_device else "the full shape needs a GPU"
        for name, _ in sections:
            check.sections[name] = {"status": "skipped", "reason": f"{reason}; --tiny runs on the CPU"}
        check.save()
        print(f"{reason}: only the environment was checked ({check.out})", file=sys.stderr)
        return 2
    for name, fn in sections:
        check.run(name, fn)

    check.result["finished"] = True
    check.save()
    print(summary_table(check))
    print(f"\nwrote {check.out} ({check.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
