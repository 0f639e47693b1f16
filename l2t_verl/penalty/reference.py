"""Reference computations of the penalty: the literal eq. 4 form, and a central finite difference.

:func:`episode_penalties_exact` builds each episode's gradient with autograd and the explicit matrix
``g_k g_k^T + lambda I`` (tests only: one backward per episode and a ``d x d`` matrix).
:func:`finite_difference_derivatives` gets the per-token directional derivatives from two forwards at
``W -+ h dW_r / ||dW_r||``: no autodiff at all, for models whose ops have neither a forward-mode rule nor
only per-position ops after P; in bf16 its errors reach 10% and more.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from l2t_verl.penalty.batch import TokenBatch, eval_mode, prepare_batch, result_dtype
from l2t_verl.penalty.output_layer import token_logprobs
from l2t_verl.penalty.proxy import DEFAULT_DAMPING, LowRankUpdate, compute_dtype

__all__ = [
    "episode_penalties_by_gradients",
    "episode_penalties_exact",
    "finite_difference_derivatives",
    "full_vocab_logprobs",
]


@contextmanager
def _upcast_modules(modules: list[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Run ``modules`` in ``dtype``: cast their floating inputs up and their outputs back, so the
    perturbed fp32 proxy weights meet fp32 activations inside, and the rest of the model sees its
    own dtype."""

    def cast(obj: Any, to: torch.dtype) -> Any:
        if isinstance(obj, Tensor) and obj.is_floating_point():
            return obj.to(to)
        if isinstance(obj, tuple):
            return tuple(cast(o, to) for o in obj)
        if isinstance(obj, list):
            return [cast(o, to) for o in obj]
        return obj

    handles = []
    try:
        for module in modules:
            out_dtypes: list[torch.dtype] = []

            def pre_hook(mod: nn.Module, args: tuple, kwargs: dict, _out: list = out_dtypes) -> tuple:
                first = next((a for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
                _out.append(first.dtype if first is not None else dtype)
                return cast(args, dtype), {k: cast(v, dtype) for k, v in kwargs.items()}

            def post_hook(mod: nn.Module, args: tuple, output: Any, _out: list = out_dtypes) -> Any:
                return cast(output, _out.pop())

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def finite_difference_derivatives(
    model: nn.Module, update: LowRankUpdate, batch: TokenBatch, chunk: int, eps: float | None
) -> Tensor:
    """Central-difference ``d/de log pi(z_t | z_<t; W + e dW_r)`` for the N episode tokens, ``[N]``."""
    params = dict(model.named_parameters())
    model_dtype = params[update.names[0]].dtype
    if eps is None:
        # Central differences balance O(h^2) truncation against rounding/h: h ~ cbrt(machine eps)
        # of the precision the logits are computed in (fp32: 5e-3, bf16: 0.2, fp64: 6e-6).
        eps = torch.finfo(model_dtype).eps ** (1.0 / 3.0)
    norm = update.sq_norm().sqrt()
    owners: dict[int, nn.Module] = {}
    for name in update.names:
        prefix, _, _ = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        owners[id(owner)] = owner
    # The P modules run in fp32 (fp64 for fp64 weights): in bf16, W + eps * dW_r would round to W.
    compute = compute_dtype(model_dtype)
    upcast = [m for m in owners.values() if any(p.dtype != compute for p in m.parameters(recurse=False))]
    prefix_of = {id(m): n for n, m in model.named_modules()}
    base: dict[str, Tensor] = {}
    for module in upcast:
        prefix = prefix_of[id(module)]
        for pname, p in module.named_parameters(recurse=False):
            base[f"{prefix}.{pname}" if prefix else pname] = p.detach().to(compute)

    # Step h along the unit direction dW_r / ||dW_r||, with h relative to the size of the proxy
    # weights (textbook h = eps * characteristic |x|): an update of lr ~ 1e-6 is far too small a
    # step for fp32 logits, and a fixed absolute h would depend on the model's weight scale.
    weight_norm = torch.sqrt(sum(params[n].detach().to(compute).square().sum() for n in update.names))
    step = eps * max(float(weight_norm), 1.0)
    results = []
    for sign in (1.0, -1.0):
        scale = (sign * step / norm).to(compute)
        overrides = dict(base)
        for name in update.names:
            weight = params[name].detach().to(compute)
            overrides[name] = weight + scale * update.dense(name).to(weight.device, compute)
        with _upcast_modules(upcast, compute):
            results.append(token_logprobs(model, batch, chunk, overrides))
    plus, minus = results
    # d/de f(W + e dW_r) = ||dW_r|| * d/ds f(W + s dW_r / ||dW_r||)
    return (plus - minus) * (norm.to(plus.dtype) / (2.0 * step))


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
    batch = prepare_batch(
        model, update, input_ids, attention_mask, episode_ids, position_ids, forward_kwargs, k_max
    )
    dtype = result_dtype(model, update)
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
    with torch.enable_grad(), eval_mode(model):
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


def episode_penalties_by_gradients(
    model: nn.Module,
    update: LowRankUpdate,
    input_ids: Tensor,
    attention_mask: Tensor,
    episode_ids: Tensor,
    damping: float = DEFAULT_DAMPING,
) -> Tensor:
    """The exact reference for proxies too large for an explicit ``d x d`` matrix: per (sample, episode)
    one autograd backward for ``g_k``, then ``<dW_r, g_k>^2 + damping ||dW_r||^2`` (the same quadratic
    form as :func:`episode_penalties_exact`). fp32, ``[B, K]`` with ``K = episode_ids.max() + 1``;
    benchmarks and ``scripts/gpu_check.py`` time the fast path against it."""
    params = dict(model.named_parameters())
    proxy = [params[n] for n in update.names]
    dtheta = [update.dense(n).to(params[n].device, torch.float32) for n in update.names]
    reg = damping * update.sq_norm().float()
    k_max = int(episode_ids.max()) + 1
    out = torch.zeros(input_ids.shape[0], k_max, device=input_ids.device)
    with torch.enable_grad():
        logp = full_vocab_logprobs(model, input_ids, attention_mask, grad=True)
        targets = episode_ids[:, 1:]
        for b in range(input_ids.shape[0]):
            for k in range(k_max):
                selected = targets[b] == k
                if not selected.any():
                    continue
                grads = torch.autograd.grad(logp[b][selected].sum(), proxy, retain_graph=True)
                inner = sum((g.float() * d).sum() for g, d in zip(grads, dtheta, strict=True))
                out[b, k] = inner.square() + reg.to(out.device)
    return out


def full_vocab_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, grad: bool = False
) -> Tensor:
    """``log pi(z_t | z_<t)`` ``[B, T-1]`` the plain way verl's log-prob forward computes it: the whole
    ``[B, T, V]`` logits, a full-vocabulary log-softmax, a gather. The baseline the penalty's time and
    memory are measured against."""
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
