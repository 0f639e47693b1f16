"""The compression penalty on Megatron-core models: reverse mode through tensor-, sequence- and
pipeline-parallel layers (docs/method.md §3, "Engines").

The method is :mod:`l2t_verl.penalty.directional`'s ``reverse``: forward hooks on P's linear layers keep
``V x_t``; the output layer's pre-hook takes the summed episode log-likelihood's gradient at its input
(``chunked_logprob_grads`` over the vocabulary-parallel weight: no ``[T, V]`` logits), and one
``autograd.grad`` from there, on the last pipeline stage, gives P's outputs' gradients ``gy_t``;
``<dW_r, grad log p_t> = sum_W (gy_t^T U_W)(V_W x_t)``
(:func:`~l2t_verl.penalty.directional.lowrank_contraction`). ``dW_r`` is :class:`LowRankUpdate` of the
Hugging Face (HF) matrices, so both engines share P's names, its SVD and the episode sums; only the layout
below is Megatron's.

On tensor-parallel rank i of n (the layout is :mod:`l2t_verl.penalty.megatron_layout`'s): a
column-parallel linear (``gate_proj`` / ``up_proj`` in ``linear_fc1``) holds rows ``U_i`` of U, so
``gy_t U_i`` is summed over the ranks while ``V x_t`` is the same on every rank; a row-parallel one
(``down_proj`` in ``linear_fc2``, ``o_proj``) holds columns ``V_i`` of V, so ``V_i x_i`` is summed while
``gy_t`` is the same on every rank. Both sums are all-reduces of ``[tokens, r]``. Under sequence
parallelism a column-parallel layer's input and a row-parallel layer's output are split along the
sequence, so ``V x`` resp. ``gy U`` are gathered along it instead (also ``[tokens, r]``). Transformer
Engine's ``LayerNormColumnParallelLinear`` receives the input before its fused norm; the hook applies the
norm first.

The default proxy, the last layer's MLP, lies on the last pipeline stage, where the log-likelihood is
computed too, so the backward never crosses a stage. megatron-core is imported lazily: this module loads
without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from l2t_verl.penalty.batch import TokenBatch, episode_penalty_values, micro_batch_rows, token_batch
from l2t_verl.penalty.directional import lowrank_contraction
from l2t_verl.penalty.megatron_layout import ProxyPiece, all_gather_along, locate_proxy, tensor_parallel_info
from l2t_verl.penalty.output_layer import DEFAULT_LOGIT_CHUNK, chunked_logprob_grads
from l2t_verl.penalty.proxy import LowRankUpdate

__all__ = ["megatron_episode_penalties", "megatron_schedule"]


# --------------------------------------------------------------------------------------------------
# Reverse-mode directional derivatives


def _fused_norm_input(linear: nn.Module, x: Tensor) -> Tensor:
    # Transformer Engine's LayerNormColumnParallelLinear normalises its input inside the layer: the
    # matrix multiplies norm(x), not x.
    weight = linear.layer_norm_weight.float()
    if getattr(linear, "zero_centered_gamma", False):
        weight = weight + 1
    eps = float(getattr(linear, "eps", 1e-5))
    x = x.float()
    if getattr(linear, "normalization", "LayerNorm") == "RMSNorm":
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight
    bias = getattr(linear, "layer_norm_bias", None)
    return F.layer_norm(x, (x.shape[-1],), weight, None if bias is None else bias.float(), eps)


class _MegatronTap:
    """Hooks on P's Megatron linears: the graph is recorded from the first of them on, each keeps
    ``V x_t`` (reduced or gathered over the tensor-parallel group) and exposes its output to autograd."""

    def __init__(self, pieces: dict[str, ProxyPiece], update: LowRankUpdate) -> None:
        self.entries: dict[int, list[tuple[ProxyPiece, Tensor, Tensor]]] = {}
        self.handles = []
        for name in update.names:
            piece = pieces[name]
            u, v = update.factors[name]
            device = piece.linear.weight.device
            u_local, v_local = piece.local_factors(u.to(device), v.to(device))
            key = id(piece.linear)
            if key not in self.entries:
                self.entries[key] = []
                self.handles.append(piece.linear.register_forward_pre_hook(self._pre))
                self.handles.append(piece.linear.register_forward_hook(self._post))
            self.entries[key].append((piece, u_local, v_local))
        self.projected: dict[str, Tensor] = {}  # HF name -> [s, b, r] V x_t
        self.outputs: dict[int, Tensor] = {}  # linear -> its output [s, b, m_local] in the graph

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _pre(self, module: nn.Module, args: tuple) -> None:
        # The layers before P run graph-free; the backward then costs what runs after P only.
        torch.set_grad_enabled(True)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if id(module) in self.outputs:
            raise ValueError("the Megatron penalty's proxy layer ran twice in one forward")
        with torch.no_grad():
            x = args[0].detach()
            if getattr(module, "layer_norm_weight", None) is not None:
                x = _fused_norm_input(module, x)
            for piece, _, v in self.entries[id(module)]:
                projected = x.to(v.dtype) @ v.T
                if piece.location.parallel == "row":
                    if piece.tp_size > 1:
                        dist.all_reduce(projected, group=piece.tp_group)
                elif piece.sequence_parallel:
                    projected = all_gather_along(projected, piece.tp_group, piece.tp_size, 0)
                self.projected[piece.hf_name] = projected
        y = output[0] if isinstance(output, tuple) else output
        if not y.requires_grad:
            y = y.detach().requires_grad_(True)
        self.outputs[id(module)] = y
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def derivatives(self, hidden: Tensor, grad_hidden: Tensor) -> Tensor:
        """Per position ``[s, b]``: ``<dW_r, grad log p>`` of the token each position predicts, from the
        output layer's input ``hidden`` and the log-likelihood's gradient there."""
        keys = list(self.outputs)
        grads = torch.autograd.grad(
            hidden, [self.outputs[k] for k in keys], grad_outputs=grad_hidden, allow_unused=True
        )
        total = None
        for key, gy in zip(keys, grads, strict=True):
            for piece, u, _ in self.entries[key]:
                if gy is None:  # the same on every rank: P took no part in this log-likelihood
                    continue
                gy_u = gy[..., piece.local_rows()].to(u.dtype) @ u
                if piece.location.parallel == "column":
                    if piece.tp_size > 1:
                        dist.all_reduce(gy_u, group=piece.tp_group)
                elif piece.sequence_parallel:
                    gy_u = all_gather_along(gy_u, piece.tp_group, piece.tp_size, 0)
                term = lowrank_contraction(gy_u, self.projected[piece.hf_name])
                total = term if total is None else total + term
        self.projected.clear()
        self.outputs.clear()
        if total is None:
            return hidden.new_zeros(())
        return total


@dataclass(frozen=True)
class _MicroBatch:
    rows: list[int]  # indices into the whole batch
    batch: TokenBatch  # on the model's device, [b, s]
    position_ids: Tensor


class _PenaltyStep:
    """The ``forward_step`` Megatron's pipeline schedules call: one micro-batch's forward, and on the
    last stage the output layer's scoring and a "loss" that computes the per-token derivatives and
    keeps them."""

    def __init__(self, tap: _MegatronTap | None, chunk: int) -> None:
        self.tap = tap
        self.chunk = chunk
        self.results: list[tuple[_MicroBatch, Tensor]] = []
        self.current: _MicroBatch | None = None
        self.scored: tuple[Tensor, Tensor] | None = None

    def score_in_output_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pre-hook of the output layer (last stage): the log-likelihood's gradient at its input, from the
        episode positions only and in chunks; the layer then computes logits for one position, which
        nothing reads. Its own backward (and weight-gradient accumulation) never runs."""
        if getattr(module, "bias", None) is not None:
            raise ValueError("the Megatron penalty supports an output layer without bias")
        hidden = args[0]  # [s, b, h]; [s / n, b, h] under sequence parallelism
        weight = kwargs.get("weight")
        weight = module.weight if weight is None else weight  # tied embeddings arrive as an argument
        tp_rank, tp_size, tp_group = tensor_parallel_info()
        split = bool(getattr(module, "sequence_parallel", False)) and tp_size > 1
        whole = all_gather_along(hidden.detach(), tp_group, tp_size, 0) if split else hidden.detach()
        batch = self.current.batch
        rows = whole.transpose(0, 1)[:, :-1][batch.valid]
        grad = torch.zeros(whole.shape[1], whole.shape[0], whole.shape[2], device=whole.device)
        grad[:, :-1][batch.valid] = chunked_logprob_grads(
            rows, weight.detach(), None, batch.targets, self.chunk, vocab_group=tp_group
        ).float()
        grad = grad.transpose(0, 1)
        if split:
            grad = grad.chunk(tp_size, 0)[tp_rank]
        self.scored = (hidden, grad.to(hidden.dtype))
        return (hidden[:1], *args[1:]), kwargs

    def __call__(self, data_iterator: Iterator[_MicroBatch], model: nn.Module) -> tuple[Tensor, Callable]:
        micro = next(data_iterator)
        self.current = micro
        # Right padding under the causal mask is exact for every real token: padding only follows them.
        # The mask is explicit (True = masked) because megatron-core's local attention builds its default
        # one on a CUDA device; Transformer Engine's causal attention ignores it.
        width = micro.batch.input_ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=micro.batch.input_ids.device).triu(1)
        output = model(micro.batch.input_ids, micro.position_ids, causal[None, None])
        return output, partial(self._score, micro)

    def _score(self, micro: _MicroBatch, logits: Tensor) -> tuple[Tensor, dict]:
        if self.tap is None or self.scored is None:
            raise RuntimeError("the Megatron penalty's last pipeline stage holds no proxy matrix")
        batch = micro.batch
        hidden, grad = self.scored
        self.scored = None
        if hidden.requires_grad:
            per_position = self.tap.derivatives(hidden, grad)
        else:  # P took no part in the forward
            per_position = hidden.new_zeros(())
        torch.set_grad_enabled(False)  # the proxy pre-hook switched it on; the next micro-batch starts off
        if per_position.ndim == 0:
            per_token = per_position.new_zeros(int(batch.valid.sum()))
        else:
            per_token = per_position.transpose(0, 1)[:, :-1][batch.valid]
        self.results.append((micro, per_token.detach()))
        return logits.new_zeros(()), {}


def megatron_schedule(forward_step: Callable, chunks: Sequence[nn.Module], micro_batches: list) -> None:
    """Run ``forward_step`` over the micro-batches with megatron-core's own pipeline schedule, forward
    only. Shapes travel with the activations (verl's ``variable_seq_lengths``), as in verl's engine."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=list(chunks),
        num_microbatches=len(micro_batches),
        seq_length=1,
        micro_batch_size=1,
        forward_only=True,
    )


def megatron_episode_penalties(
    chunks: Sequence[nn.Module],
    update: LowRankUpdate | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    episode_ids: Tensor,
    damping: float,
    *,
    k_max: int | None = None,
    position_ids: Tensor | None = None,
    max_tokens: int | None = None,
    logit_chunk: int = DEFAULT_LOGIT_CHUNK,
    schedule: Callable = megatron_schedule,
) -> Tensor:
    """Raw penalties ``p_k = <dW_r, g_k>^2 + damping * ||dW_r||^2`` ``[B, K_max]`` (fp32, CPU) of a
    right-padded batch on a Megatron model (``chunks``: this rank's model chunks), as
    :func:`~l2t_verl.penalty.episode_penalties` computes them on one module.

    ``update``: ``dW_r`` of P by HF name on the last pipeline stage (which holds P), ``None`` on the
    others. Every rank of the model-parallel groups calls this with the same batch; every rank returns
    the last stage's result. Micro-batches follow ``max_tokens`` as on FSDP, each trimmed to its longest
    row (rounded up to a multiple of the tensor-parallel size under sequence parallelism). ``schedule``
    runs the forward steps (megatron-core's pipeline schedule; tests pass a CPU one). The output layer
    scores only the episode positions, ``logit_chunk`` at a time (its ``[T, V]`` logits are never formed).
    The parameters are frozen for the pass (``requires_grad`` off, then back on): the backward, from the
    output layer's input to P, computes input gradients only; megatron-core's own (non-TE) linears still
    accumulate a weight gradient where gradient-accumulation fusion is on, so the caller zeros the
    gradients afterwards. Parameter values and optimizer state are not touched.
    """
    from megatron.core import parallel_state as mpu

    if len(chunks) != 1:
        raise ValueError(
            f"the Megatron penalty supports one model chunk per rank (no virtual pipeline); got {len(chunks)}"
        )
    if not damping >= 0.0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    whole = token_batch(input_ids, attention_mask, episode_ids, position_ids, None, k_max)
    penalties = torch.zeros(whole.exists.shape, dtype=torch.float32)
    last = mpu.is_pipeline_last_stage(ignore_virtual=True)
    tap = None
    if last:
        if update is None:
            raise ValueError("the last pipeline stage needs the update dW_r of the proxy set")
        pieces = locate_proxy(chunks, update.names)
        missing = [n for n in update.names if n not in pieces]
        if missing:
            raise ValueError(f"proxy matrix {missing[0]!r} is not on the last pipeline stage of this model")
        tap = _MegatronTap(pieces, update)
    device = next(chunks[0].parameters()).device
    config = chunks[0].config if hasattr(chunks[0], "config") else None
    tp_size = mpu.get_tensor_model_parallel_world_size()
    multiple = tp_size if config is not None and getattr(config, "sequence_parallel", False) else 1
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    micro_batches = []
    for rows, longest in micro_batch_rows(whole.attention_mask, max_tokens):
        width = -(-max(longest, 2) // multiple) * multiple
        pad = max(0, width - input_ids.shape[1])
        index = torch.tensor(rows)

        def take(t: Tensor, fill: int) -> Tensor:
            return F.pad(t[index, :width], (0, pad), value=fill).to(device)  # noqa: B023

        mask = take(whole.attention_mask, 0)
        part = token_batch(take(input_ids, 0), mask, take(episode_ids, -1), None, None, whole.num_episodes)
        micro_batches.append(_MicroBatch(rows, part, take(position_ids, 0)))
    step = _PenaltyStep(tap, logit_chunk)
    hooks = []
    if last:
        heads = [m for n, m in chunks[0].named_modules() if n.split(".")[-1] == "output_layer"]
        if len(heads) != 1:
            raise ValueError(f"expected one output_layer on the last pipeline stage, found {len(heads)}")
        hooks.append(heads[0].register_forward_pre_hook(step.score_in_output_layer, with_kwargs=True))
    # No weight gradient is wanted: with the parameters frozen for the pass, Transformer Engine's linears
    # after P compute only their input gradients (and write nothing into Megatron's gradient buffers,
    # which may sit offloaded in CPU memory); P's outputs enter the graph through the tap.
    frozen = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    try:
        with torch.no_grad():
            if micro_batches and whole.num_episodes > 0:
                schedule(step, chunks, micro_batches)
    finally:
        for param in frozen:
            param.requires_grad_(True)
        if tap is not None:
            tap.remove()
        for hook in hooks:
            hook.remove()
    if last and step.results:
        reg = damping * float(update.sq_norm())
        for micro, per_token in step.results:
            value = episode_penalty_values(per_token.float(), micro.batch, reg)
            penalties[micro.rows] = value.cpu()
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        shared = penalties.to(device)
        src = mpu.get_pipeline_model_parallel_last_rank()
        dist.broadcast(shared, src=src, group=mpu.get_pipeline_model_parallel_group())
        penalties = shared.cpu()
    return penalties
