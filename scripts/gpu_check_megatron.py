"""The Megatron pieces of ``scripts/gpu_check.py``'s ``megatron`` section (loaded by that script).

A random fp32 megatron-core GPT (RMSNorm, SwiGLU, rope, q/k/v bias, no other bias: Qwen2's layout), a
rank-8 update ``dW_r`` of the last layer's MLP in Hugging Face (HF) names, a right-padded batch with
several episodes per sample, and two independent ways to the penalty ``<dW_r, g_k>^2`` (damping 0):

- reverse mode: ``l2t_verl.penalty.megatron.megatron_episode_penalties`` (the code under test);
- central finite differences of each episode's log-likelihood ``L_k = sum_{t in k} log p_t`` along
  ``dW_r`` applied to the Megatron linears by hand (gate and up stacked ``[gate; up]`` in ``linear_fc1``,
  down = ``linear_fc2``), with the log-probs from the logits (full log-softmax, explicit causal mask).

and, on CUDA, ``fp32_master_weights`` against a real ``DistributedOptimizer`` around a bf16 copy.

Transformer Engine runs fp32 GEMMs in TF32 (its cuBLAS call asks for ``CUBLAS_COMPUTE_32F_FAST_TF32``
whenever all operands are fp32, whatever torch's flags say): a finite difference through it would
measure TF32 rounding, not the derivative. So the reference is taken on a local-spec twin with the same
weights (torch GEMMs, TF32 off), which computes the same function in true fp32.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Reverse mode agrees with fp32 finite differences when no episode's penalty is off by more than this,
# relative to the larger of its reference and ERROR_FLOOR times the batch's largest reference penalty.
FD_TOLERANCE = 1e-2
ERROR_FLOOR = 1e-2
MASTER_GRAD_SCALE = 1e-3
MASTER_LR = 1e-6


@dataclass(frozen=True)
class MegatronShape:
    hidden: int
    layers: int
    heads: int
    query_groups: int
    ffn: int
    vocab: int
    lengths: tuple[int, ...]  # one right-padded sample each
    prompt: int
    episodes: int


# Qwen-like, small enough for a few seconds of H200 time (reverse mode, four fp32 / fp64 forwards, a
# Transformer Engine model with its local twin and a bf16 copy under Megatron's optimizer).
MEGATRON_FULL = MegatronShape(1024, 4, 16, 4, 2816, 32768, (512, 448, 384, 320), 64, 4)
# tests/megatron_ranks.py's model.
MEGATRON_TINY = MegatronShape(32, 4, 4, 2, 48, 64, (24, 19, 15), 4, 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    began = time.perf_counter()
    value = fn()
    _sync(device)
    return value, round(time.perf_counter() - began, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def megatron_runtime(device: torch.device, seed: int = 0) -> Iterator[None]:
    """A one-process torch.distributed world and megatron-core's model-parallel state (sizes 1), all
    undone on exit so that the sections after this one run as before."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    current_device = torch.cuda.current_device
    tf32 = torch.backends.cuda.matmul.allow_tf32
    own_group = False
    try:
        if device.type == "cpu":
            # megatron-core's forward allocates its buffers with device=torch.cuda.current_device(); on
            # the CPU (--tiny, the CI smoke test) that must answer "cpu". Undone below; never on a GPU.
            torch.cuda.current_device = lambda: "cpu"
        elif device.index is not None:
            torch.cuda.set_device(device)
        # The fp32 reference must be fp32: no TF32 in torch's own matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        if not dist.is_initialized():
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
            own_group = True
        if dist.get_world_size() != 1:
            raise RuntimeError(f"the megatron section runs in one process, not {dist.get_world_size()}")
        mpu.initialize_model_parallel(1, 1)
        if device.type == "cuda":
            tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
        else:
            # No dropout runs; the inference tracker stands in for the CUDA RNG tracker.
            tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        yield
    finally:
        try:
            mpu.destroy_model_parallel()
        finally:
            if own_group:
                dist.destroy_process_group()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            torch.cuda.current_device = current_device
            torch.backends.cuda.matmul.allow_tf32 = tf32


def transformer_engine_version() -> str | None:
    try:
        import transformer_engine
    except Exception:
        return None
    return str(getattr(transformer_engine, "__version__", "unknown"))


def build_gpt(
    shape: MegatronShape, device: torch.device, spec: str, *, bf16: bool = False, seed: int = 0
) -> nn.Module:
    """A random fp32 GPTModel of ``shape`` in eval mode; ``spec``: "transformer_engine" or "local".
    ``bf16`` sets ``config.bf16`` (the weights stay fp32 until ``Float16Module`` casts them)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    cpu = device.type == "cpu"
    config = TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads,
        num_query_groups=shape.query_groups,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.hidden**-0.5,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        bf16=bf16,
        use_cpu_initialization=cpu,
        variable_seq_lengths=True,  # as verl's engine; no effect without pipeline stages
        moe_token_dispatcher_type="alltoall",  # the default refuses variable_seq_lengths (no MoE here)
    )
    if spec == "transformer_engine":
        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    elif spec == "local":
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    else:
        raise ValueError(f"unknown layer spec {spec!r}")
    torch.manual_seed(seed)
    model = GPTModel(
        config,
        layer_spec,
        vocab_size=shape.vocab,
        max_sequence_length=max(shape.lengths),
        position_embedding_type="rope",
        rotary_base=1000000,
        share_embeddings_and_output_weights=False,
        pre_process=True,
        post_process=True,
    )
    return model.to(device).eval()


# Transformer Engine fuses the norms into the next linear; the local spec keeps them as modules
# (megatron-core's own sharded_state_dict_keys_map for the local spec, reversed).
_TE_TO_LOCAL = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
)


def local_twin(model: nn.Module, shape: MegatronShape, device: torch.device) -> nn.Module:
    """A local-spec GPTModel with ``model``'s (Transformer Engine) weights."""
    twin = build_gpt(shape, device, "local", seed=1)
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        for te_name, local_name in _TE_TO_LOCAL:
            name = name.replace(te_name, local_name)
        state[name] = value
    missing, unexpected = twin.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"TE -> local weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return twin


def proxy_linears(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``linear_fc1`` ([gate; up]) and ``linear_fc2`` (down) of the last decoder layer."""
    mlp = model.decoder.layers[-1].mlp
    return mlp.linear_fc1, mlp.linear_fc2


def random_update(model: nn.Module, names: Sequence[str], rank: int, scale: float, seed: int = 2) -> Any:
    """``dW_r`` (HF names gate, up, down of the last layer) of a random step: N(0, 1) times ``scale``
    relative to a std-0.02 weight (gpu_check's ``UPDATE_SCALE`` on Qwen's init), i.e. ``scale / 0.02``
    times the weights' RMS, truncated to ``rank``."""
    from l2t_verl.penalty import LowRankUpdate

    fc1, fc2 = proxy_linears(model)
    gate, up = fc1.weight.detach().float().chunk(2, dim=0)
    weights = dict(zip(names, (gate, up, fc2.weight.detach().float()), strict=True))
    gen = torch.Generator(device=gate.device).manual_seed(seed)
    deltas = {
        name: (scale / 0.02)
        * float(w.square().mean().sqrt())
        * torch.randn(w.shape, generator=gen, device=w.device)
        for name, w in weights.items()
    }
    return LowRankUpdate.from_deltas(deltas, rank)


def episode_batch(shape: MegatronShape, device: torch.device, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, mask and episode ids: ``prompt`` tokens (-1), then ``episodes`` equal episodes;
    the second sample ends with a few tokens outside every episode (-1)."""
    width = max(shape.lengths)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, shape.vocab, (len(shape.lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    episodes = torch.full_like(ids, -1)
    for i, n in enumerate(shape.lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
        end = n - (max(1, n // 8) if i == 1 else 0)
        span = end - shape.prompt
        episodes[i, shape.prompt : end] = torch.arange(span) * shape.episodes // span
    return ids.to(device), mask.to(device), episodes.to(device)


def one_stage_schedule(step: Callable, chunks: Sequence[nn.Module], micro_batches: list) -> None:
    """megatron-core's forward-only schedule for one pipeline stage, for the CPU (its own schedule
    creates CUDA tensors): the forward step, then its loss function, per micro-batch."""
    for micro in micro_batches:
        output, loss_func = step(iter([micro]), chunks[0])
        loss_func(output)


def episode_loglik(model: nn.Module, ids: Tensor, mask: Tensor, episodes: Tensor, k_max: int) -> Tensor:
    """``L_k = sum_{t in episode k} log p_t`` ``[B, K]`` (fp64): logits of the whole right-padded batch
    (explicit causal mask, positions 0..s-1), full log-softmax in fp64, the token t's log-prob at t-1."""
    width = ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).triu(1)[None, None]
    positions = torch.arange(width, device=ids.device)[None].expand_as(ids)
    with torch.no_grad():
        logits = model(ids, positions, causal)
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    targets = episodes[:, 1:]
    valid = (mask[:, 1:] != 0) & (targets >= 0)
    slot = (torch.arange(ids.shape[0], device=ids.device)[:, None] * k_max + targets)[valid]
    out = torch.zeros(ids.shape[0] * k_max, dtype=torch.float64, device=ids.device)
    out.index_add_(0, slot, logp[valid])
    return out.view(ids.shape[0], k_max).cpu()


def floored_rel_err(value: torch.Tensor, reference: torch.Tensor, floor: float) -> float:
    """:func:`max_rel_err` with each denominator at least ``floor`` times the largest reference value.

    A finite difference's noise is absolute, and so is TF32's in Transformer Engine's reverse mode: an
    episode whose derivative happens to be small shows a large relative error without anything being
    wrong, while a penalty of 1% of the batch's largest moves the loss by 1% as much."""
    value, reference = value.double().cpu(), reference.double().cpu()
    scale = reference.abs().max() * floor
    return float(((value - reference).abs() / reference.abs().clamp_min(scale)).max())


def episode_exists(mask: Tensor, episodes: Tensor, k_max: int) -> Tensor:
    targets = episodes[:, 1:].cpu()
    valid = (mask[:, 1:].cpu() != 0) & (targets >= 0)
    exists = torch.zeros(episodes.shape[0], k_max, dtype=torch.bool)
    for b in range(episodes.shape[0]):
        exists[b, targets[b][valid[b]].unique()] = True
    return exists


def finite_difference_penalties(
    model: nn.Module,
    update: Any,
    names: Sequence[str],
    ids: Tensor,
    mask: Tensor,
    episodes: Tensor,
    k_max: int,
) -> tuple[Tensor, dict[str, Any]]:
    """``d_k^2`` ``[B, K]`` (fp64, CPU) with ``d_k = (L_k(W + h u) - L_k(W - h u)) ||dW_r|| / (2h)``,
    ``u = dW_r / ||dW_r||`` added to the last layer's ``linear_fc1`` / ``linear_fc2`` in the model's dtype.

    The step rule is ``l2t_verl.penalty.reference.finite_difference_derivatives``'s: ``h = eps *
    max(||W_P||_F, 1)`` with ``eps`` the cube root of the dtype's machine epsilon (fp32: 4.9e-3, fp64:
    6.1e-6), which balances the O(h^2) truncation against rounding / h. The weights are put back exactly."""
    gate, up, down = names
    fc1, fc2 = proxy_linears(model)
    dtype = fc1.weight.dtype
    deltas = {
        fc1: torch.cat([update.dense(gate), update.dense(up)]),  # Megatron's [gate; up] (TP size 1)
        fc2: update.dense(down),
    }
    base = {lin: lin.weight.detach().clone() for lin in deltas}
    norm = float(update.sq_norm().double().sqrt())
    weight_norm = math.sqrt(sum(float(w.double().square().sum()) for w in base.values()))
    eps = torch.finfo(dtype).eps ** (1.0 / 3.0)
    step = eps * max(weight_norm, 1.0)
    results = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for lin, delta in deltas.items():
                    lin.weight.copy_(base[lin] + (sign * step / norm) * delta.to(base[lin].device, dtype))
            results.append(episode_loglik(model, ids, mask, episodes, k_max))
    finally:
        with torch.no_grad():
            for lin, weight in base.items():
                lin.weight.copy_(weight)
    plus, minus = results
    derivative = (plus - minus) * (norm / (2.0 * step))
    exists = episode_exists(mask, episodes, k_max)
    penalties = torch.where(exists, derivative.square(), torch.zeros_like(derivative))
    info = {
        "dtype": str(dtype).removeprefix("torch."),
        "eps": eps,
        "step": step,
        "proxy_weight_norm": weight_norm,
        "update_norm": norm,
    }
    return penalties, info


@contextmanager
def in_dtype(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """``model`` cast to ``dtype`` in place, cast back on exit (fp32 -> fp64 -> fp32 is exact)."""
    before = next(model.parameters()).dtype
    model.to(dtype)
    try:
        yield model
    finally:
        model.to(before)


def bf16_rounding_bound(values: Tensor) -> Tensor:
    """Half a bf16 unit in the last place of each fp32 value: the most rounding to bf16 moves it."""
    _, exponent = torch.frexp(values)
    return torch.ldexp(torch.ones_like(values), exponent - 9)


def masters_check(fp32_model: nn.Module, shape: MegatronShape, device: torch.device, spec: str) -> dict:
    """``fp32_master_weights`` of the last layer's ``linear_fc1`` / ``linear_fc2`` on a bf16 copy of
    ``fp32_model`` under megatron-core's ``DistributedOptimizer`` (``Float16Module``,
    ``DistributedDataParallel`` with fp32 grad buffers): before and after one Adam step at lr 1e-6 on small
    random gradients written into the grad buffers. The fp32 masters move; almost no bf16 weight does (a
    step far below bf16's resolution), which is why dW must come from the masters."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from l2t_verl.penalty.megatron_layout import fp32_master_weights

    model = build_gpt(shape, device, spec, bf16=True, seed=3)
    model.load_state_dict(fp32_model.state_dict())
    config = model.config
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    ddp = DistributedDataParallel(config, ddp_config, Float16Module(config, model))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=MASTER_LR, bf16=True, use_distributed_optimizer=True), [ddp]
    )
    params = list(p.weight for p in proxy_linears(model))
    record: dict[str, Any] = {
        "optimizers": [type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])],
        "param_dtypes": [str(p.dtype).removeprefix("torch.") for p in params],
        "numel": sum(p.numel() for p in params),
    }

    def compare(values: list[Tensor]) -> dict[str, Any]:
        diffs = [(v - p.detach().float()).abs() for v, p in zip(values, params, strict=True)]
        beyond = sum(int((d > bf16_rounding_bound(v)).sum()) for d, v in zip(diffs, values, strict=True))
        return {
            "max_abs_master_minus_bf16": max(float(d.max()) for d in diffs),
            "beyond_bf16_rounding": beyond,
            "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in values}),
        }

    before, fallbacks = fp32_master_weights(params, optimizer)
    record["fallbacks"] = fallbacks
    record["before_step"] = compare(before)
    ddp.zero_grad_buffer()
    gen = torch.Generator(device=device).manual_seed(5)
    for p in params:
        p.main_grad.copy_(MASTER_GRAD_SCALE * torch.randn(p.shape, generator=gen, device=device))
    ddp.finish_grad_sync()
    bf16_before = [p.detach().clone() for p in params]
    stepped = optimizer.step()
    _sync(device)
    after, fallbacks_after = fp32_master_weights(params, optimizer)
    record.update(
        step={"lr": MASTER_LR, "grad_scale": MASTER_GRAD_SCALE, "update_successful": bool(stepped[0])},
        fallbacks_after_step=fallbacks_after,
        after_step=compare(after),
        masters_changed=sum(int((a != b).sum()) for a, b in zip(after, before, strict=True)),
        bf16_changed=sum(int((p.detach() != q).sum()) for p, q in zip(params, bf16_before, strict=True)),
        max_abs_master_change=max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True)),
    )
    return record
