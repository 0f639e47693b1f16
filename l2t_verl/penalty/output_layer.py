"""The output layer's log-probs of the episode tokens, in chunks of positions (docs/method.md §3).

Every penalty method reads the log-probs from inside the output layer's own forward (where an engine such
as FSDP2 has gathered its weight): only the episode positions are scored, ``logit_chunk`` positions at a
time, and the layer then computes logits for one position only. Neither the ``[T, V]`` logits nor a
tangent or gradient of them is ever held whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from l2t_verl.penalty.batch import TokenBatch

__all__ = [
    "DEFAULT_LOGIT_CHUNK",
    "chunked_logprob_grads",
    "chunked_token_logprobs",
    "output_layer",
    "run_forward",
    "scored_in_output_layer",
    "token_logprobs",
]


DEFAULT_LOGIT_CHUNK = 1024
"""Positions per chunk of the output layer's log-softmax: ``chunk x V`` fp32 values (600 MB at
V = 152k) per live buffer instead of ``T x V``."""


def chunked_token_logprobs(
    hidden: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    targets: Tensor,
    chunk: int = DEFAULT_LOGIT_CHUNK,
) -> Tensor:
    """``log_softmax(hidden @ weight^T + bias)[n, targets[n]]`` for the rows of ``hidden`` ``[N, H]``
    (``weight=None``: the rows are logits already).

    ``chunk`` rows at a time, reduced in fp32 (fp64 for fp64): the same numbers as the unchunked
    formula with ``chunk x V`` values alive instead of ``N x V``. Plain torch ops, so forward-mode
    tangents (dual numbers, ``torch.func.jvp``) flow through it chunk by chunk as well.
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        rows = hidden[start : start + chunk]
        logits = (rows if weight is None else F.linear(rows, weight, bias)).to(dtype)
        picked = logits.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
        parts.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=dtype)


def chunked_logprob_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk: int,
    *,
    vocab_group: Any = None,
) -> Tensor:
    """``d log p_n / d hidden_n = (onehot(z_n) - softmax_n) @ weight`` per row ``[N, H]``, chunked.

    ``vocab_group``: the vocabulary is split over this process group (Megatron's vocabulary-parallel
    output layer): ``weight`` / ``bias`` are this rank's rows, ``rank * V/n`` on. Each chunk's softmax max
    and sum are then all-reduced ``[chunk]`` vectors and the ranks' shares of the gradient are summed;
    every rank of the group calls it with the same rows."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    split = vocab_group is not None and dist.get_world_size(vocab_group) > 1
    local = targets - (dist.get_rank(vocab_group) * weight.shape[0] if split else 0)
    inside = (local >= 0) & (local < weight.shape[0])
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start : start + chunk], weight, bias).to(dtype)
        top = logits.max(-1).values
        if split:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=vocab_group)
        residual = (logits - top[:, None]).exp()
        total = residual.sum(-1)
        if split:
            dist.all_reduce(total, group=vocab_group)
        residual /= -total[:, None]
        hit = inside[start : start + chunk]
        residual[hit.nonzero().squeeze(-1), local[start : start + chunk][hit]] += 1.0
        parts.append((residual.to(weight.dtype) @ weight).to(dtype))
    grads = torch.cat(parts) if parts else hidden.new_zeros(0, weight.shape[1], dtype=dtype)
    if split:
        dist.all_reduce(grads, group=vocab_group)
    return grads


def output_layer(model: nn.Module) -> nn.Linear | None:
    get = getattr(model, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    return layer if isinstance(layer, nn.Linear) else None


@contextmanager
def scored_in_output_layer(
    model: nn.Module, batch: TokenBatch, chunk: int, score: Callable[[Tensor, Tensor, Tensor | None], Any]
) -> Iterator[list]:
    """While active, the model's output layer calls ``score(hidden_rows, weight, bias)`` on the episode
    positions' hidden states (appending the result to the yielded list) and then computes logits for
    the last position only.

    The hook runs inside the output layer's own forward, after any pre-forward hook of the engine
    (FSDP2 gathers the layer's weight there), so the full weight is what ``score`` sees.
    """
    layer = output_layer(model)
    if layer is None:
        raise ValueError("the model has no nn.Linear output layer (get_output_embeddings())")
    results: list = []

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        results.append(score(hidden, module.weight, module.bias))
        return (hidden[:, -1:], *args[1:])

    handle = layer.register_forward_pre_hook(pre_hook)
    try:
        yield results
    finally:
        handle.remove()


def run_forward(model: nn.Module, batch: TokenBatch, params: Mapping[str, Tensor] | None = None) -> None:
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.kwargs}
    if params is None:
        model(**kwargs)
    else:
        functional_call(model, dict(params), args=(), kwargs=kwargs)


def token_logprobs(
    model: nn.Module, batch: TokenBatch, chunk: int, params: Mapping[str, Tensor] | None = None
) -> Tensor:
    """``log pi(z_t | z_<t)`` of the N episode tokens ``[N]`` (carrying any tangent of the forward)."""
    targets = batch.targets
    if output_layer(model) is None:
        # Not a causal LM with a linear output layer: score its logits, still in chunks of positions.
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.kwargs}
        out = model(**kwargs) if params is None else functional_call(model, dict(params), (), kwargs)
        rows = (out.logits if hasattr(out, "logits") else out)[:, :-1][batch.valid]
        return chunked_token_logprobs(rows, None, None, targets, chunk)

    def score(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return chunked_token_logprobs(hidden[:, :-1][batch.valid], weight, bias, targets, chunk)

    with scored_in_output_layer(model, batch, chunk, score) as results:
        run_forward(model, batch, params)
    if len(results) != 1:
        raise RuntimeError(f"the output layer ran {len(results)} times in one forward; expected once")
    return results[0]
