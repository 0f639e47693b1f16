"""Per-episode Fisher penalties of L2T (docs/method.md §3; paper Theorem 4.2, eq. 4): the production path.

For a proxy set ``P`` of weight matrices (:mod:`l2t_verl.penalty.proxy`) and episode ``k`` of a response::

    dW    = W_now - W_ref                                 for every W in P
    dW_r  = rank-r truncated SVD of dW                    (LowRankUpdate)
    g_k   = grad_P log pi(z_k | s_k) = sum_{t in episode k} grad_P log pi(z_t | z_<t)
    p_k   = <dW_r, g_k>^2 + lambda * ||dW_r||^2             (inner product and norm summed over P)
          = dtheta~^T (g_k g_k^T + lambda I) dtheta~        (damped rank-1 Fisher form of eq. 4)

``<dW_r, g_k>`` is the directional derivative of episode k's log-likelihood along ``dW_r``, so
:func:`episode_penalties` gets the per-token directional derivatives of a whole micro-batch from one
pass (:mod:`l2t_verl.penalty.directional`) and segment-sums them per episode; its cost does not depend
on the number of episodes K. Micro-batches are cut by a token budget and trimmed to their own longest
sequence (:mod:`l2t_verl.penalty.batch`).

Pure torch: any ``nn.Module`` whose ``forward(input_ids=..., attention_mask=...)`` runs an ``nn.Linear``
output layer (``get_output_embeddings()``, e.g. Hugging Face causal LMs). The model is never mutated.
Non-finite values (NaN/inf weights, updates or logits) are NOT repaired here: they propagate into the
returned penalties so that the caller can count them (``l2t/penalty_nonfinite``, docs/method.md §8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from l2t_verl.penalty.batch import (
    episode_penalty_values,
    eval_mode,
    micro_batch_rows,
    prepare_batch,
    result_dtype,
)
from l2t_verl.penalty.directional import fast_directional_derivatives, in_last_layer_mlp
from l2t_verl.penalty.output_layer import DEFAULT_LOGIT_CHUNK
from l2t_verl.penalty.proxy import DEFAULT_DAMPING, LowRankUpdate
from l2t_verl.penalty.reference import finite_difference_derivatives

__all__ = ["DEFAULT_DAMPING", "auto_method", "episode_penalties"]


PenaltyMethod = Literal["auto", "forward_ad", "reverse", "jvp", "finite_difference"]


def auto_method(model: nn.Module, update: LowRankUpdate) -> str:
    """What ``method="auto"`` runs: ``reverse`` when P lies in the last decoder layer's MLP (only
    per-position ops follow it, so reverse mode is exact there; it is the faster and leaner of the two
    in benchmarks/penalty.py), ``forward_ad`` for any other proxy."""
    return "reverse" if in_last_layer_mlp(model, update) else "forward_ad"


def episode_penalties(
    model: nn.Module,
    update: LowRankUpdate,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    episode_ids: Tensor,
    damping: float = DEFAULT_DAMPING,
    *,
    method: PenaltyMethod = "auto",
    eps: float | None = None,
    position_ids: Tensor | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    k_max: int | None = None,
    max_tokens: int | None = None,
    logit_chunk: int = DEFAULT_LOGIT_CHUNK,
) -> Tensor:
    """Raw penalties ``p_k = <dW_r, g_k>^2 + damping * ||dW_r||^2`` (docs/method.md §3), shape ``[B, K_max]``.

    ``episode_ids`` ``[B, T]``: ``k >= 0`` marks the tokens of episode k (position t's log-prob is
    predicted from logits at t - 1, so ``episode_ids[:, 0]`` must be -1), ``-1`` elsewhere.
    ``K_max = episode_ids.max() + 1`` unless ``k_max`` fixes a (larger) width. Slots of episodes a
    sample does not have are 0; ``K_max = 0`` gives ``[B, 0]`` without running the model.

    ``method`` (:mod:`l2t_verl.penalty.directional`): ``"forward_ad"`` (one forward with dual numbers from the
    proxy layers' outputs on; any proxy; attention with forward-mode rules is switched in for the
    pass when a tangent reaches attention), ``"reverse"`` (one forward and a backward from the output
    layer to P; exact only with nothing but per-position ops after P, e.g. the last layer's MLP,
    which is checked: a proxy followed by attention raises ``ValueError``; any attention kernel),
    ``"jvp"`` (``torch.func.jvp`` over ``functional_call``), ``"finite_difference"`` (two forwards at
    ``W -+ h dW_r / ||dW_r||``, ``h = eps * max(||W_P||_F, 1)``, P run in fp32; ``eps=None`` picks
    ``cbrt(finfo(model dtype).eps)``; in bf16 errors of 10% and more), ``"auto"``
    (:func:`auto_method`: ``reverse`` for proxies in the last layer's MLP, else ``forward_ad``).

    ``max_tokens``: micro-batch the rows so that each micro-batch's padded size (rows x its longest
    sequence, by ``attention_mask``) stays within it; each micro-batch is trimmed to its own longest
    sequence and moved to the proxy's device. ``None``: one micro-batch. ``logit_chunk``: positions
    per chunk of the output layer's log-softmax (the ``[T, V]`` logits are never held whole).

    ``position_ids`` / ``forward_kwargs`` are passed to the model's forward (e.g. position ids of a
    left-padded batch, ``use_cache=False``). The model runs in eval mode without a parameter
    gradient; its parameters, buffers and training flags are left as they were. The result is fp32
    (fp64 for fp64 models) on ``input_ids``' device; non-finite values are returned as they are.
    """
    if not damping >= 0.0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if method == "auto":
        method = auto_method(model, update)
    if method not in ("forward_ad", "reverse", "jvp", "finite_difference"):
        raise ValueError(
            f"unknown penalty method {method!r}; expected 'auto', 'forward_ad', 'reverse', 'jvp' or "
            "'finite_difference'"
        )
    if method == "finite_difference" and eps is not None and not eps > 0.0:
        raise ValueError(f"finite-difference eps must be > 0, got {eps}")
    batch = prepare_batch(
        model, update, input_ids, attention_mask, episode_ids, position_ids, forward_kwargs, k_max
    )
    dtype = result_dtype(model, update)
    penalties = torch.zeros(batch.exists.shape, dtype=dtype, device=input_ids.device)
    if batch.num_episodes == 0 or update.is_zero:
        # No episode, or no update: p_k = 0^2 + damping * 0 = 0 exactly; no forward needed.
        return penalties
    reg = damping * float(update.sq_norm())
    device = dict(model.named_parameters())[update.names[0]].device
    if device.type == "meta":
        device = input_ids.device
    mask = batch.attention_mask
    with eval_mode(model):
        for rows, width in micro_batch_rows(mask, max_tokens):
            index = torch.tensor(rows, device=input_ids.device)
            part = prepare_batch(
                model,
                update,
                input_ids[index, :width].to(device),
                mask[index, :width].to(device),
                episode_ids[index, :width].to(device),
                None if position_ids is None else position_ids[index, :width].to(device),
                forward_kwargs,
                batch.num_episodes,
            )
            if method == "finite_difference":
                per_token = finite_difference_derivatives(model, update, part, logit_chunk, eps)
            else:
                per_token = fast_directional_derivatives(model, update, part, method, logit_chunk=logit_chunk)
            value = episode_penalty_values(per_token.to(dtype), part, reg)
            penalties[index] = value.to(penalties.device)
    return penalties
