"""Parameter compression penalty of L2T (docs/method.md §3; paper Theorem 4.2, eq. 4).

For a proxy set ``P`` of weight matrices (chosen by a regex, :mod:`l2t_verl.proxy`) and episode ``k``
of a response::

    dW    = W_now - W_ref                                 for every W in P
    dW_r  = rank-r truncated SVD of dW                    (LowRankUpdate)
    g_k   = grad_P log pi(z_k | s_k) = sum_{t in episode k} grad_P log pi(z_t | z_<t)
    p_k   = <dW_r, g_k>^2 + lambda * ||dW_r||^2             (inner product and norm summed over P)
          = dtheta~^T (g_k g_k^T + lambda I) dtheta~        (damped rank-1 Fisher form of eq. 4)

``<dW_r, g_k>`` is the directional derivative of episode k's log-likelihood along ``dW_r``, so
:func:`episode_penalties` gets the per-token directional derivatives for a whole micro-batch from
one pass (:mod:`l2t_verl.directional`: forward mode, reverse mode or a central difference) and
segment-sums them per episode; its cost does not depend on the number of episodes K. Micro-batches
are cut by a token budget and trimmed to their own longest sequence. :func:`episode_penalties_exact`
builds the per-episode gradients and the explicit matrices ``g_k g_k^T + lambda I``; it is the test
reference.

This module is pure torch + stdlib: it works on any ``nn.Module`` whose
``forward(input_ids=..., attention_mask=...)`` runs an ``nn.Linear`` output layer
(``get_output_embeddings()``, e.g. Hugging Face causal LMs). It never mutates the model.

Non-finite values (NaN/inf weights, updates or logits) are NOT repaired here: they propagate into
the returned penalties so that the caller can count them (``l2t/penalty_nonfinite``, docs/method.md §8).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from l2t_verl.directional import DEFAULT_LOGIT_CHUNK, TokenBatch, directional_derivatives, in_last_layer_mlp
from l2t_verl.proxy import (
    EXACT_SVD_MAX_NUMEL,
    LowRankUpdate,
    decoder_layer_indices,
    last_layer_mlp_regex,
    proxy_regex,
    random_layer_regex,
    select_proxy_params,
)

__all__ = [
    "DEFAULT_DAMPING",
    "EXACT_SVD_MAX_NUMEL",
    "LowRankUpdate",
    "auto_method",
    "decoder_layer_indices",
    "episode_penalties",
    "episode_penalties_exact",
    "last_layer_mlp_regex",
    "proxy_regex",
    "random_layer_regex",
    "select_proxy_params",
    "token_budget_groups",
]

DEFAULT_DAMPING = 1e-5
"""Fisher damping lambda of the paper (App. E)."""

PenaltyMethod = Literal["auto", "forward_ad", "reverse", "jvp", "finite_difference"]


def auto_method(model: nn.Module, update: LowRankUpdate) -> str:
    """What ``method="auto"`` runs: ``reverse`` when P lies in the last decoder layer's MLP (only
    per-position ops follow it, so reverse mode is exact there; it is the faster and leaner of the two
    in benchmarks/penalty.py), ``forward_ad`` for any other proxy."""
    return "reverse" if in_last_layer_mlp(model, update) else "forward_ad"


def token_budget_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Sample indices in micro-batches whose padded size (count x longest) stays within ``max_tokens``.

    Longest first, so that similar lengths share a micro-batch and little is padded; a sample longer
    than the budget gets a micro-batch of its own. Every index appears exactly once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in sorted(range(len(lengths)), key=lambda j: -int(lengths[j])):
        if current and width * (len(current) + 1) > max_tokens:
            groups.append(current)
            current = []
        if not current:
            width = max(int(lengths[i]), 1)
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _prepare(
    model: nn.Module,
    update: LowRankUpdate,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    episode_ids: Tensor,
    position_ids: Tensor | None,
    forward_kwargs: Mapping[str, Any] | None,
    k_max: int | None,
) -> TokenBatch:
    params = dict(model.named_parameters())
    for name in update.names:
        if name not in params:
            raise ValueError(f"proxy parameter {name!r} of the update is not a parameter of the model")
        if tuple(params[name].shape) != tuple(update.shape(name)):
            raise ValueError(
                f"update for {name!r} has shape {tuple(update.shape(name))}, the parameter has "
                f"{tuple(params[name].shape)}"
            )
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if episode_ids.shape != input_ids.shape:
        raise ValueError(
            f"episode_ids shape {tuple(episode_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if episode_ids.dtype.is_floating_point or episode_ids.dtype.is_complex or episode_ids.dtype == torch.bool:
        raise ValueError(f"episode_ids must be an integer tensor, got {episode_ids.dtype}")
    episode_ids = episode_ids.to(device=input_ids.device, dtype=torch.long)
    if bool((episode_ids < -1).any()):
        raise ValueError("episode_ids must be >= 0 for episode tokens and -1 elsewhere")
    if bool((episode_ids[:, 0] >= 0).any()):
        raise ValueError("episode_ids[:, 0] must be -1: the first token has no logits predicting it")
    if bool(((episode_ids >= 0) & (attention_mask == 0)).any()):
        raise ValueError("episode_ids marks padding tokens (attention_mask == 0) as episode tokens")
    present = int(episode_ids.max().item()) + 1 if episode_ids.numel() else 0
    if k_max is None:
        k_max = present
    elif k_max < 0:
        raise ValueError(f"k_max must be >= 0, got {k_max}")
    elif k_max < present:
        raise ValueError(f"k_max={k_max} but episode_ids contains episode index {present - 1}")

    kwargs = dict(forward_kwargs or {})
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    targets = episode_ids[:, 1:]
    valid = targets >= 0
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(targets)
    slot = (rows * k_max + targets)[valid]
    exists = torch.zeros(input_ids.shape[0] * k_max, dtype=torch.bool, device=input_ids.device)
    exists[slot] = True
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        kwargs=kwargs,
        valid=valid,
        slot=slot,
        exists=exists.view(input_ids.shape[0], k_max),
        num_episodes=k_max,
    )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Dropout would make the derivative random; restore each submodule's own flag afterwards, since
    # model.train(mode) would overwrite mixed states.
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in states:
            module.training = training


def _result_dtype(model: nn.Module, update: LowRankUpdate) -> torch.dtype:
    p = dict(model.named_parameters())[update.names[0]]
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _segment_sum(values: Tensor, batch: TokenBatch) -> Tensor:
    """Per-episode sums ``[B, K]`` of per-token values ``[N]`` (one scatter_add, any K)."""
    out = values.new_zeros(batch.exists.numel())
    out.scatter_add_(0, batch.slot, values)
    return out.view_as(batch.exists)


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

    ``method`` (:mod:`l2t_verl.directional`): ``"forward_ad"`` (one forward with dual numbers from the
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
    batch = _prepare(
        model, update, input_ids, attention_mask, episode_ids, position_ids, forward_kwargs, k_max
    )
    dtype = _result_dtype(model, update)
    penalties = torch.zeros(batch.exists.shape, dtype=dtype, device=input_ids.device)
    if batch.num_episodes == 0 or update.is_zero:
        # No episode, or no update: p_k = 0^2 + damping * 0 = 0 exactly; no forward needed.
        return penalties
    reg = damping * float(update.sq_norm())
    device = dict(model.named_parameters())[update.names[0]].device
    if device.type == "meta":
        device = input_ids.device
    mask = batch.attention_mask
    last = torch.arange(1, mask.shape[1] + 1, device=mask.device) * (mask != 0)
    lengths = last.max(dim=1).values.tolist()
    groups = [list(range(len(lengths)))] if max_tokens is None else token_budget_groups(lengths, max_tokens)
    with _eval_mode(model):
        for rows in groups:
            index = torch.tensor(rows, device=input_ids.device)
            width = max(max(lengths[i] for i in rows), 1)
            part = _prepare(
                model,
                update,
                input_ids[index, :width].to(device),
                mask[index, :width].to(device),
                episode_ids[index, :width].to(device),
                None if position_ids is None else position_ids[index, :width].to(device),
                forward_kwargs,
                batch.num_episodes,
            )
            per_token = directional_derivatives(model, update, part, method, logit_chunk=logit_chunk, eps=eps)
            inner = _segment_sum(per_token.to(dtype), part)  # <dW_r, g_k>
            value = torch.where(part.exists, inner.square() + reg, torch.zeros_like(inner))
            penalties[index] = value.to(penalties.device)
    return penalties


def _full_logits(model: nn.Module, params: Mapping[str, Tensor], batch: TokenBatch) -> Tensor:
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.kwargs}
    out = functional_call(model, dict(params), args=(), kwargs=kwargs)
    return out.logits if hasattr(out, "logits") else out


def episode_penalties_exact(
    model: nn.Module,
    update: LowRankUpdate,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    episode_ids: Tensor,
    damping: float = DEFAULT_DAMPING,
    *,
    position_ids: Tensor | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    k_max: int | None = None,
    max_proxy_numel: int = 8192,
) -> Tensor:
    """Test reference for :func:`episode_penalties`: the literal eq. 4 quadratic form.

    For each (sample, episode): ``g_k`` = autograd gradient of the episode's summed token
    log-probs w.r.t. the proxy parameters (flattened in ``update.names`` order), the explicit
    ``F_k = g_k g_k^T + damping * I`` and ``p_k = dtheta^T F_k dtheta`` with ``dtheta`` = flattened
    ``dW_r``. One backward per episode and a ``d x d`` matrix (``d`` = proxy size, capped by
    ``max_proxy_numel``): only practical on tiny models.
    """
    if not damping >= 0.0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    batch = _prepare(
        model, update, input_ids, attention_mask, episode_ids, position_ids, forward_kwargs, k_max
    )
    dtype = _result_dtype(model, update)
    size = sum(math.prod(update.shape(n)) for n in update.names)
    if size > max_proxy_numel:
        raise ValueError(
            f"exact penalty needs a {size}x{size} Fisher matrix; max_proxy_numel={max_proxy_numel}"
        )
    penalties = torch.zeros(batch.exists.shape, dtype=dtype, device=input_ids.device)
    if batch.num_episodes == 0:
        return penalties

    params = dict(model.named_parameters())
    # Fresh leaves: the model's own requires_grad flags and .grad stay untouched.
    proxy = {n: params[n].detach().clone().requires_grad_(True) for n in update.names}
    dtheta = torch.cat(
        [update.dense(n).to(device=input_ids.device, dtype=dtype).flatten() for n in update.names]
    )
    identity = torch.eye(size, dtype=dtype, device=input_ids.device)
    with torch.enable_grad(), _eval_mode(model):
        # Deliberately the plain formula (full logits, log_softmax, gather), not the chunked path.
        logits = _full_logits(model, proxy, batch)[:, :-1][batch.valid].to(dtype)
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[:, None]).squeeze(-1)
        for b, k in batch.exists.nonzero().tolist():
            selected = batch.slot == b * batch.num_episodes + k
            grads = torch.autograd.grad(token_lp[selected].sum(), list(proxy.values()), retain_graph=True)
            g = torch.cat([grad.to(dtype).flatten() for grad in grads])
            fisher = torch.outer(g, g) + damping * identity
            penalties[b, k] = (dtheta @ fisher @ dtheta).detach()
    return penalties
