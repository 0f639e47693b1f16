"""Rank processes for tests/test_megatron_penalty.py: a tiny megatron-core GPT on CPU with gloo.

megatron-core 0.16.1 builds its GPT model on the CPU (``use_cpu_initialization``), but its forward
allocates communication and attention buffers with ``device=torch.cuda.current_device()``; these rank
processes answer ``"cpu"`` there (the one CPU accommodation, in these processes only). Its pipeline
schedules create ``device="cuda"`` tensors outright, so a CPU schedule here runs the same
``forward_step`` stage by stage with point-to-point sends, as the schedule does.

Every run builds the model from the same logical (tensor-parallel size 1) weights, generated per
parameter name from a seed, and loads this rank's shard of them the way Megatron splits them.
"""

from __future__ import annotations

import os
import re
import types
import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, FFN, HEADS, GROUPS, LAYERS = 64, 32, 48, 4, 2, 4
RANK, DAMPING = 3, 1e-5
PROXY = [f"model.layers.{LAYERS - 1}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
# Three right-padded samples: prompt, then episodes (ids >= 0) and a tail (-1).
LENGTHS = [15, 11, 13]
EPISODES = [
    [-1] * 4 + [0] * 3 + [1] * 4 + [2] * 2 + [-1] * 2,
    [-1] * 3 + [0] * 5 + [1] * 3,
    [-1] * 5 + [0] * 2 + [1] * 2 + [2] * 3 + [-1],
]


class SequenceParallelNorm(nn.Module):
    """RMSNorm for the sequence-parallel runs: megatron-core's own torch norm refuses sequence
    parallelism (its weight gradient needs an all-reduce, irrelevant to a forward), Apex and
    Transformer Engine, which allow it, do not run on a CPU."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(LENGTHS)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), width), generator=gen)
    mask = torch.zeros_like(ids)
    episodes = torch.full_like(ids, -1)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
        ids[i, n:] = 0
        episodes[i, : len(EPISODES[i])] = torch.tensor(EPISODES[i])
    return ids, mask, episodes


def update():
    """A rank-3 dW_r of the HF proxy matrices, the same in every process."""
    from l2t_verl.penalty import LowRankUpdate

    gen = torch.Generator().manual_seed(11)
    shapes = {PROXY[0]: (FFN, HIDDEN), PROXY[1]: (FFN, HIDDEN), PROXY[2]: (HIDDEN, FFN)}
    deltas = {n: 0.05 * torch.randn(*s, generator=gen) for n, s in shapes.items()}
    return LowRankUpdate.from_deltas(deltas, RANK)


def fused_norm_linear_fc1() -> type:
    """A column-parallel linear with the pre-MLP RMSNorm inside it, laid out like Transformer Engine's
    ``LayerNormColumnParallelLinear`` (``layer_norm_weight``, ``normalization``, ``eps``): its forward hook
    sees the input before the norm. Megatron's TE spec fuses the norm this way."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class FusedNormColumnParallelLinear(ColumnParallelLinear):
        def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = nn.Parameter(torch.ones(input_size))
            self.normalization = "RMSNorm"
            self.eps = config.layernorm_epsilon
            self.zero_centered_gamma = False

        def forward(self, x: torch.Tensor, *args, **kwargs):
            normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.layer_norm_weight
            return super().forward(normed, *args, **kwargs)

    return FusedNormColumnParallelLinear


def build(
    tp: int, pp: int, sequence_parallel: bool = False, tied: bool = False, fused_norm: bool = False
) -> nn.Module:
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    # No dropout is used; the inference tracker stands in for the CUDA RNG tracker.
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # the default refuses variable_seq_lengths (no MoE here)
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if fused_norm:
        from megatron.core.transformer.identity_op import IdentityOp

        spec.submodules.pre_mlp_layernorm = IdentityOp
        spec.submodules.mlp.submodules.linear_fc1 = fused_norm_linear_fc1()
    if sequence_parallel:
        spec.submodules.input_layernorm = ModuleSpec(module=SequenceParallelNorm)
        spec.submodules.pre_mlp_layernorm = ModuleSpec(module=SequenceParallelNorm)
        spec = TransformerBlockSubmodules(layer_specs=[spec] * LAYERS, layer_norm=SequenceParallelNorm)
    model = GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=64,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=tied,
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=mpu.is_pipeline_last_stage(),
    )
    load_logical_weights(model, tp, mpu.get_tensor_model_parallel_rank())
    return model.eval()


def _global_name(model: nn.Module, name: str) -> str:
    """Parameter name with the layer's global index (a pipeline stage numbers its layers from 0)."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if match is None:
        return name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


def load_logical_weights(model: nn.Module, tp: int, tp_rank: int) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            # A fused norm holds the values the separate pre-MLP norm would: the same function.
            key = _global_name(model, name).replace(
                "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"
            )
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= tp
            gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            if param.ndim == 1:
                full = 1.0 + 0.1 * torch.randn(*shape, generator=gen)
            else:
                full = torch.randn(*shape, generator=gen) / shape[-1] ** 0.5
            if dim is None:
                param.copy_(full)
            elif key.endswith("mlp.linear_fc1.weight"):
                # Megatron splits gate and up separately and stacks [gate_i; up_i] on rank i.
                gate, up = full.chunk(2, dim=0)
                param.copy_(torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]]))
            else:
                param.copy_(full.chunk(tp, dim)[tp_rank])


def cpu_schedule(step: Callable, chunks: list[nn.Module], micro_batches: list) -> None:
    """The forward-only pipeline schedule on CPU: each stage runs ``step`` per micro-batch, receiving
    its input from the previous stage and sending its output (shape first) to the next."""
    from megatron.core import parallel_state as mpu

    model = chunks[0]
    first, last = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
    for micro in micro_batches:
        if not first:
            shape = torch.empty(3, dtype=torch.long)
            dist.recv(shape, src=mpu.get_pipeline_model_parallel_prev_rank())
            hidden = torch.empty(*shape.tolist())
            dist.recv(hidden, src=mpu.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        output, loss_func = step(iter([micro]), model)
        if last:
            loss_func(output)
        else:
            dist.send(torch.tensor(output.shape), dst=mpu.get_pipeline_model_parallel_next_rank())
            dist.send(output.detach().contiguous(), dst=mpu.get_pipeline_model_parallel_next_rank())


def exact_reference(model: nn.Module, dw) -> torch.Tensor:
    """``p_k = <dW_r, g_k>^2 + damping ||dW_r||^2`` from one autograd gradient per token of the unsharded
    model (tensor- and pipeline-parallel size 1): ``g_t = grad log p_t`` of linear_fc1 / linear_fc2 in the
    last layer, ``<dW_r, g_t>`` with the dense dW_r (gate and up stacked as in linear_fc1)."""
    ids, mask, episodes = batch()
    layer = model.decoder.layers[LAYERS - 1].mlp
    dense_fc1 = torch.cat([dw.dense(PROXY[0]), dw.dense(PROXY[1])])
    dense_fc2 = dw.dense(PROXY[2])
    k_max = int(episodes.max()) + 1
    out = torch.zeros(len(LENGTHS), k_max)
    for b in range(len(LENGTHS)):
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)[None, None]
        logits = model(ids[b : b + 1], torch.arange(ids.shape[1])[None], causal)
        logprobs = torch.log_softmax(logits[0].float(), -1)
        inner = torch.zeros(k_max)
        for t in range(1, ids.shape[1]):
            k = int(episodes[b, t])
            if k < 0:
                continue
            weights = [layer.linear_fc1.weight, layer.linear_fc2.weight]
            g1, g2 = torch.autograd.grad(logprobs[t - 1, ids[b, t]], weights, retain_graph=True)
            inner[k] += (g1 * dense_fc1).sum() + (g2 * dense_fc2).sum()
        present = torch.zeros(k_max, dtype=torch.bool)
        present[episodes[b][episodes[b] >= 0].unique()] = True
        out[b] = torch.where(present, inner.square() + DAMPING * float(dw.sq_norm()), torch.zeros(k_max))
    return out


def backend_penalties(model: nn.Module, dw) -> dict:
    """The actor's Megatron backend (``engine_penalty.MegatronPenalty``) as the worker drives it, on a
    stand-in for verl's ``MegatronEngine`` (which needs CUDA) holding what the backend reads of it: the
    model chunks, the transformer config, the optimizer (none: fp32 parameters are their own masters) and
    ``optimizer_zero_grad``. The batch comes in verl's jagged layout."""
    from tensordict import TensorDict

    from l2t_verl.engine_penalty import MegatronPenalty
    from l2t_verl.penalty import LowRankUpdate

    zeroed = []
    engine = types.SimpleNamespace(
        module=[model], tf_config=model.config, optimizer=None, optimizer_zero_grad=lambda: zeroed.append(1)
    )
    ids, _, episodes = batch()
    settings = {"damping": DAMPING, "max_episodes": int(episodes.max()) + 1, "max_token_len": 20}
    backend = MegatronPenalty(engine, settings)
    backend.schedule = cpu_schedule
    current = backend.snapshot()
    update = None
    if current:  # W_ref = W_now - dW_r: the worker's rank-r SVD of the update gives dW_r back
        reference = {n: w - dw.dense(n) for n, w in current.items()}
        update = LowRankUpdate.from_tensors(current, reference, rank=RANK, seed=0)

    def jagged(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.nested.as_nested_tensor(rows, layout=torch.jagged)

    data = TensorDict(
        {
            "input_ids": jagged([ids[i, :n] for i, n in enumerate(LENGTHS)]),
            "position_ids": jagged([torch.arange(n) for n in LENGTHS]),
            "l2t_episode_ids": jagged([episodes[i, 1:n] for i, n in enumerate(LENGTHS)]),
        },
        batch_size=[len(LENGTHS)],
    )
    penalties = backend.penalties(update, data, settings)
    return {"backend": penalties, "backend_zeroed": len(zeroed), "backend_snapshot": sorted(current)}


def run(rank: int, world: int, port: int, tp: int, pp: int, options: dict, out_dir: str) -> None:
    torch.cuda.current_device = lambda: "cpu"  # see the module docstring
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from megatron.core import parallel_state as mpu

        from l2t_verl.penalty.megatron import megatron_episode_penalties
        from l2t_verl.penalty.megatron_layout import gather_hf_matrix, locate_proxy

        model = build(tp, pp, **options)
        dw = update()
        last = mpu.is_pipeline_last_stage()
        ids, mask, episodes = batch()
        result = {}
        for max_tokens in (None, 20):  # one micro-batch; then several of different widths
            result[f"penalties_{max_tokens}"] = megatron_episode_penalties(
                [model],
                dw if last else None,
                ids,
                mask,
                episodes,
                DAMPING,
                max_tokens=max_tokens,
                schedule=cpu_schedule,
            )
        result["grads_untouched"] = all(p.grad is None for p in model.parameters())
        result["trainable_again"] = all(p.requires_grad for p in model.parameters())  # frozen for the pass
        if last:  # the HF matrices reassembled from the shards
            pieces = locate_proxy([model], PROXY)
            result["hf"] = {n: gather_hf_matrix(p, p.linear.weight.detach()) for n, p in pieces.items()}
        result.update(backend_penalties(model, dw))
        if tp * pp == 1:
            result["exact"] = exact_reference(model, dw)
            result["fc1"] = model.decoder.layers[LAYERS - 1].mlp.linear_fc1.weight.detach().clone()
            result["fc2"] = model.decoder.layers[LAYERS - 1].mlp.linear_fc2.weight.detach().clone()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class DistributedMasters:
    """The part of megatron-core's ``DistributedOptimizer`` that :func:`fp32_master_weights` reads, for
    two data-parallel ranks on CPU (the real one allocates on CUDA in its constructor): each rank keeps a
    contiguous range of each parameter's flattened fp32 master, possibly none of it."""

    def __init__(self, params: list[nn.Parameter], masters: list[torch.Tensor], spans: list[tuple[int, int]]):
        from megatron.core.optimizer.distrib_optimizer import Range

        owned = [(p, m, s) for p, m, s in zip(params, masters, spans, strict=True) if s[1] > s[0]]
        self.model_float16_groups = [[p for p, _, _ in owned]]
        self.shard_fp32_from_float16_groups = [[m.reshape(-1)[s[0] : s[1]].clone() for _, m, s in owned]]
        self.model_param_gbuf_map = {p: (0, torch.bfloat16, 0) for p in params}
        self.data_parallel_group = dist.group.WORLD
        self._ranges = {id(p): Range(*s) for p, _, s in owned}

    def _get_model_param_range_map(self, param: nn.Parameter) -> dict:
        return {"param": self._ranges[id(param)]}


def run_masters(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from l2t_verl.penalty.megatron_layout import fp32_master_weights

        gen = torch.Generator().manual_seed(3)
        masters = [torch.randn(6, 4, generator=gen), torch.randn(5, 3, generator=gen)]
        params = [nn.Parameter(m.to(torch.bfloat16)) for m in masters]
        outside = nn.Parameter(torch.randn(2, 2, generator=gen).to(torch.bfloat16))  # not in the optimizer
        # Rank 0 holds [0, 10) of the first and all of the second; rank 1 the rest of the first.
        spans = [(0, 10), (0, 15)] if rank == 0 else [(10, 24), (0, 0)]
        chained = type("Chained", (), {"chained_optimizers": [DistributedMasters(params, masters, spans)]})()
        values, fallbacks = fp32_master_weights([*params, outside], chained)
        # A precision-aware optimizer keeps its masters in its own state: every parameter falls back.
        chained.chained_optimizers[0].config = types.SimpleNamespace(
            use_precision_aware_optimizer_no_fp8_or_ds_fp8=True
        )
        aware, aware_fallbacks = fp32_master_weights([*params, outside], chained)
        torch.save(
            {
                "values": values,
                "masters": masters,
                "outside": outside.detach().float(),
                "fallbacks": fallbacks,
                "aware": aware,
                "aware_fallbacks": aware_fallbacks,
                "params": [p.detach().float() for p in [*params, outside]],
            },
            os.path.join(out_dir, f"masters{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
