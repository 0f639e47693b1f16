"""Parameter compression penalty of L2T (docs/method.md §3; paper Theorem 4.2, eq. 4).

For a proxy set ``P`` of weight matrices (chosen by a regex) and episode ``k`` of a response::

    dW    = W_now - W_ref                                 for every W in P
    dW_r  = rank-r truncated SVD of dW
    g_k   = grad_P log pi(z_k | s_k) = sum_{t in episode k} grad_P log pi(z_t | z_<t)
    p_k   = <dW_r, g_k>^2 + lambda * ||dW_r||^2             (inner product and norm summed over P)
          = dtheta~^T (g_k g_k^T + lambda I) dtheta~        (damped rank-1 Fisher form of eq. 4)

``<dW_r, g_k>`` is the directional derivative of episode k's log-likelihood along ``dW_r``, so the
fast path (:func:`episode_penalties`) gets the per-token directional derivatives
``d/de log pi(z_t | z_<t; W + e * dW_r)`` at ``e = 0`` for the whole batch from ONE forward-mode
JVP (or from a central finite difference: two forwards) and segment-sums them per episode. Its cost
does not depend on the number of episodes K. :func:`episode_penalties_exact` builds the per-episode
gradients and the explicit matrices ``g_k g_k^T + lambda I``; it is the test reference.

This module is pure torch + stdlib: it works on any ``nn.Module`` whose
``forward(input_ids=..., attention_mask=...)`` returns an object with ``.logits`` ``[B, T, V]``
(e.g. Hugging Face causal LMs). It never mutates the model: weights are substituted through
:func:`torch.func.functional_call`, which puts the originals back even when the forward raises.

Non-finite values (NaN/inf weights, updates or logits) are NOT repaired here: they propagate into
the returned penalties so that the caller can count them (``l2t/penalty_nonfinite``, docs/method.md §8).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "DEFAULT_DAMPING",
    "EXACT_SVD_MAX_NUMEL",
    "LowRankUpdate",
    "decoder_layer_indices",
    "episode_penalties",
    "episode_penalties_exact",
    "last_layer_mlp_regex",
    "proxy_regex",
    "random_layer_regex",
    "select_proxy_params",
]

DEFAULT_DAMPING = 1e-5
"""Fisher damping lambda of the paper (App. E)."""

EXACT_SVD_MAX_NUMEL = 1 << 22
"""``svd="auto"`` uses the exact ``torch.linalg.svd`` for matrices with at most this many entries
(4M: e.g. 1024 x 4096) and a seeded randomized SVD above it, where a full SVD of, say, a
1536 x 8960 MLP matrix costs far more than the rank-r factors need."""

_RSVD_OVERSAMPLE = 10
_RSVD_POWER_ITERS = 4
_LAYER_INDEX_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

SvdMethod = Literal["auto", "exact", "randomized"]
PenaltyMethod = Literal["jvp", "forward_ad", "finite_difference"]


# --------------------------------------------------------------------------------------------------
# Proxy selection


def select_proxy_params(model: nn.Module, regex: str) -> dict[str, nn.Parameter]:
    """The proxy set P: the 2-D parameters of ``model`` whose name matches ``regex`` (``re.search``).

    Names are those of ``model.named_parameters()`` (tied weights appear once). Raises ``ValueError``
    naming the regex when it is invalid or matches no 2-D weight.
    """
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise ValueError(f"invalid proxy regex {regex!r}: {err}") from err
    selected = {n: p for n, p in model.named_parameters() if p.ndim == 2 and pattern.search(n)}
    if not selected:
        examples = [n for n, p in model.named_parameters() if p.ndim == 2][:4]
        raise ValueError(
            f"proxy regex {regex!r} matches no 2-D weight of the model (2-D weights look like {examples})"
        )
    return selected


def decoder_layer_indices(model: nn.Module) -> list[int]:
    """Sorted decoder-layer indices parsed from parameter names like ``model.layers.<i>.``."""
    found = {int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER_INDEX_RE.search(n))}
    return sorted(found)


def _mlp_regex(layers: list[int]) -> str:
    alternatives = "|".join(str(i) for i in layers)
    return rf"(?:^|\.)layers\.(?:{alternatives})\.mlp\."


def last_layer_mlp_regex(model: nn.Module) -> str:
    """Regex for the MLP weights of the last decoder layer: the spec's default proxy set (the paper's
    "single-layer MLP")."""
    layers = decoder_layer_indices(model)
    if not layers:
        raise ValueError("no decoder layers found: no parameter name contains 'layers.<i>.'")
    regex = _mlp_regex(layers[-1:])
    select_proxy_params(model, regex)  # fail here, with the regex in the message, if it has no MLP
    return regex


def random_layer_regex(model: nn.Module, fraction: float = 0.3, seed: int = 0) -> str:
    """Regex for the MLP weights of a random ``fraction`` of the decoder layers (docs/method.md §6, ablation
    ``random_layers``; paper Fig. 4/9: a random 30% of layers).

    The choice depends only on ``seed`` and the layer count, so every data-parallel rank picks the
    same layers. At least one layer is picked.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"random_layers fraction must be in (0, 1], got {fraction}")
    layers = decoder_layer_indices(model)
    if not layers:
        raise ValueError("no decoder layers found: no parameter name contains 'layers.<i>.'")
    count = max(1, round(fraction * len(layers)))
    picked = sorted(random.Random(seed).sample(layers, count))
    regex = _mlp_regex(picked)
    select_proxy_params(model, regex)
    return regex


def proxy_regex(
    model: nn.Module,
    *,
    modules: str | None = None,
    proxy: str = "lowrank_svd",
    random_fraction: float = 0.3,
    seed: int = 0,
) -> str:
    """The proxy set P of docs/method.md §3 / §6 as a regex: an explicit ``modules`` regex, the MLPs of
    random layers (``proxy="random_layers"``), or the last decoder layer's MLP. Raises ``ValueError``
    naming the regex when it matches no 2-D weight of ``model`` (a meta-device model will do)."""
    if modules:
        select_proxy_params(model, modules)
        return modules
    if proxy == "random_layers":
        return random_layer_regex(model, fraction=random_fraction, seed=seed)
    return last_layer_mlp_regex(model)


# --------------------------------------------------------------------------------------------------
# Low-rank update dW_r


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Low-precision weights are differenced and decomposed in fp32: bf16 cannot resolve the tiny
    # per-step updates (lr ~ 1e-6) it is asked to measure.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randomized_svd(a: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Halko et al. randomized SVD with power iterations. Our own (not ``torch.svd_lowrank``) so the
    sketch uses a seeded generator: every data-parallel rank then gets the same dW_r."""
    m, n = a.shape
    q = min(rank + _RSVD_OVERSAMPLE, m, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=a.device, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(_RSVD_POWER_ITERS):  # re-orthonormalise each half-step to keep small directions
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ basis).Q).Q
    u_small, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def _truncated_svd(a: Tensor, rank: int, method: SvdMethod, seed: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors ``(U * S, Vh)`` of ``a``; ``rank`` is already clipped to ``min(a.shape)``."""
    m, n = a.shape
    if not bool(torch.isfinite(a).all()):
        # Keep the step alive (docs/method.md §8): NaN factors give NaN penalties, which the caller counts.
        nan = float("nan")
        return a.new_full((m, rank), nan), a.new_full((rank, n), nan)
    if not bool(a.any()):
        # Step 1 with reference=previous_step: exactly zero, whatever the SVD routine would round to.
        return a.new_zeros(m, rank), a.new_zeros(rank, n)
    if method == "auto":
        small = a.numel() <= EXACT_SVD_MAX_NUMEL or rank + _RSVD_OVERSAMPLE >= min(m, n)
        method = "exact" if small else "randomized"
    if method == "exact":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    elif method == "randomized":
        u, s, vh = _randomized_svd(a, rank, seed)
    else:
        raise ValueError(f"unknown svd method {method!r}; expected 'auto', 'exact' or 'randomized'")
    return u * s, vh


@dataclass(frozen=True)
class LowRankUpdate:
    """The low-rank proxy update ``dW_r = U @ V`` for every matrix of the proxy set P.

    ``factors[name] = (U [m, r_i], V [r_i, n])`` with the singular values folded into ``U``;
    ``r_i = min(rank, m, n)``. Factors are fp32 (fp64 for fp64 weights) on the weights' device.
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    rank: int

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("LowRankUpdate needs at least one proxy matrix")
        for name, (u, v) in self.factors.items():
            if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
                raise ValueError(
                    f"factors of {name!r} must be U [m, r] and V [r, n], got {tuple(u.shape)} and "
                    f"{tuple(v.shape)}"
                )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.factors)

    def shape(self, name: str) -> torch.Size:
        u, v = self.factors[name]
        return torch.Size((u.shape[0], v.shape[1]))

    def dense(self, name: str) -> Tensor:
        """``dW_r`` of one proxy matrix, ``[m, n]``."""
        u, v = self.factors[name]
        return u @ v

    def sq_norm(self) -> Tensor:
        """``||dW_r||^2`` summed over P (0-dim tensor). Uses ``||U V||_F^2 = sum((U^T U) * (V V^T))``
        so no dense m x n matrix is formed."""
        total = None
        for u, v in self.factors.values():
            term = ((u.mT @ u) * (v @ v.mT)).sum()
            total = term if total is None else total + term.to(total.device)
        assert total is not None
        return total

    @property
    def is_zero(self) -> bool:
        """True when every ``dW_r`` is exactly zero (e.g. step 1: no update yet)."""
        return all(not bool(self.dense(n).any()) for n in self.names)

    @classmethod
    def from_tensors(
        cls,
        current: Mapping[str, Tensor],
        reference: Mapping[str, Tensor],
        rank: int,
        *,
        svd: SvdMethod = "auto",
        seed: int = 0,
    ) -> LowRankUpdate:
        """Build ``dW_r`` from ``dW = current[name] - reference[name]`` (docs/method.md §3).

        ``svd``: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (seeded, power-iterated) or
        ``"auto"``: exact up to :data:`EXACT_SVD_MAX_NUMEL` entries or when ``rank`` is close to
        ``min(m, n)``, randomized otherwise. ``rank`` is clipped to ``min(m, n)`` per matrix.
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if not current:
            raise ValueError("no proxy matrices given")
        if svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"unknown svd method {svd!r}; expected 'auto', 'exact' or 'randomized'")
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        for name, weight in current.items():
            if name not in reference:
                raise KeyError(f"reference has no tensor for proxy parameter {name!r}")
            ref = reference[name]
            if tuple(ref.shape) != tuple(weight.shape):
                raise ValueError(
                    f"reference for proxy parameter {name!r} has shape {tuple(ref.shape)}, "
                    f"the parameter has {tuple(weight.shape)}"
                )
            if weight.ndim != 2:
                raise ValueError(f"proxy parameter {name!r} is not 2-D (shape {tuple(weight.shape)})")
            dtype = _compute_dtype(weight.dtype)
            with torch.no_grad():
                delta = weight.detach().to(dtype) - ref.detach().to(device=weight.device, dtype=dtype)
                factors[name] = _truncated_svd(delta, min(rank, *delta.shape), svd, seed)
        return cls(factors=factors, rank=rank)

    @classmethod
    def from_weights(
        cls,
        model: nn.Module,
        reference: Mapping[str, Tensor],
        modules: str,
        rank: int,
        *,
        svd: SvdMethod = "auto",
        seed: int = 0,
    ) -> LowRankUpdate:
        """``dW_r`` for the proxy set ``select_proxy_params(model, modules)`` against ``reference``
        (``{param name: W_ref}``; extra entries are ignored)."""
        proxy = select_proxy_params(model, modules)
        return cls.from_tensors(proxy, reference, rank, svd=svd, seed=seed)

    @classmethod
    def zero(cls, model: nn.Module, modules: str, rank: int) -> LowRankUpdate:
        """The update of step 1 (no optimizer step yet): every ``dW_r = 0``, so every penalty is
        ``lambda * 0 = 0``."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        factors = {}
        for name, p in select_proxy_params(model, modules).items():
            m, n = p.shape
            r = min(rank, m, n)
            dtype = _compute_dtype(p.dtype)
            factors[name] = (p.new_zeros(m, r, dtype=dtype), p.new_zeros(r, n, dtype=dtype))
        return cls(factors=factors, rank=rank)


# --------------------------------------------------------------------------------------------------
# Penalties


@dataclass(frozen=True)
class _Batch:
    input_ids: Tensor
    attention_mask: Tensor
    kwargs: dict[str, Any]
    valid: Tensor  # [B, T-1] bool: logits position t-1 predicts an episode token t
    slot: Tensor  # [N] flat index b * K + k of every valid token, in ``valid`` order
    exists: Tensor  # [B, K] bool: sample b has episode k
    num_episodes: int


def _prepare(
    model: nn.Module,
    update: LowRankUpdate,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    episode_ids: Tensor,
    position_ids: Tensor | None,
    forward_kwargs: Mapping[str, Any] | None,
    k_max: int | None,
) -> _Batch:
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
    return _Batch(
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


def _logits(model: nn.Module, params: Mapping[str, Tensor], batch: _Batch) -> Tensor:
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.kwargs}
    out = functional_call(model, dict(params), args=(), kwargs=kwargs)
    return out.logits if hasattr(out, "logits") else out


def _episode_token_logprobs(logits: Tensor, batch: _Batch) -> Tensor:
    """``log pi(z_t | z_<t)`` for the N episode tokens, ``[N]``, reduced in fp32 (fp64 for fp64).

    Only the episode positions are gathered before the softmax reduction, so its memory is
    ``N x V`` rather than ``B x T x V``."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    picked = logits[:, :-1][batch.valid].to(dtype)
    targets = batch.input_ids[:, 1:][batch.valid]
    return picked.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)


def _segment_sum(values: Tensor, batch: _Batch) -> Tensor:
    """Per-episode sums ``[B, K]`` of per-token values ``[N]`` (one scatter_add, any K)."""
    out = values.new_zeros(batch.exists.numel())
    out.scatter_add_(0, batch.slot, values)
    return out.view_as(batch.exists)


def _proxy_owner(model: nn.Module, name: str) -> nn.Module:
    prefix, _, _ = name.rpartition(".")
    return model.get_submodule(prefix) if prefix else model


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


def _directional_derivatives_jvp(model: nn.Module, update: LowRankUpdate, batch: _Batch) -> Tensor:
    params = dict(model.named_parameters())
    primals = {n: params[n].detach() for n in update.names}
    # jvp needs tangents in the primal dtype; only P gets a tangent, so the rest of the model stays a
    # constant and the one forward carries d/de of every token at once.
    tangents = {n: update.dense(n).to(device=p.device, dtype=p.dtype) for n, p in primals.items()}

    def token_logprobs(proxy: dict[str, Tensor]) -> Tensor:
        return _episode_token_logprobs(_logits(model, proxy, batch), batch)

    try:
        _, derivative = jvp(token_logprobs, (primals,), (tangents,))
    except (NotImplementedError, RuntimeError) as err:
        if not _is_missing_forward_ad(err):
            raise
        if "scaled_dot_product" not in str(err):
            raise _no_forward_ad(err) from err
        # The fused SDPA kernels (flash / memory-efficient, CPU and CUDA) have no forward-AD rule;
        # they are only hit when a tangent reaches an attention op, i.e. a proxy matrix sits before
        # some attention layer (the default last-layer-MLP proxy never does). Retry once with the
        # composite math kernel, which materialises the [T, T] attention scores.
        try:
            with sdpa_kernel(SDPBackend.MATH):
                _, derivative = jvp(token_logprobs, (primals,), (tangents,))
        except (NotImplementedError, RuntimeError) as err2:
            if not _is_missing_forward_ad(err2):
                raise
            raise _no_forward_ad(err2) from err2
    return derivative


def _directional_derivatives_forward_ad(model: nn.Module, update: LowRankUpdate, batch: _Batch) -> Tensor:
    """The same one-forward JVP as :func:`_directional_derivatives_jvp`, without replacing any weight.

    For a proxy layer ``y = x W^T + b``, moving W along ``dW_r = U V`` moves its output by
    ``d y / d e = x dW_r^T = (x V^T) U^T``. A forward hook on each proxy module adds that tangent to
    the module's output as a forward-mode dual number; every later op carries it to the log-probs.
    The model's parameters are only read, so this also works where they are sharded and gathered by
    hooks of their own (FSDP2 in verl's actor), which ``functional_call`` cannot see through.
    """
    owners: dict[str, nn.Module] = {}
    for name in update.names:
        owner = _proxy_owner(model, name)
        if not (
            name.endswith(".weight")
            and isinstance(getattr(owner, "weight", None), torch.Tensor)
            and isinstance(owner, nn.Linear)
        ):
            raise ValueError(f"forward_ad needs proxy weights of nn.Linear modules; {name!r} is not one")
        owners[name] = owner

    def make_hook(u: Tensor, v: Tensor):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            x = fwad.unpack_dual(args[0]).primal
            primal, tangent = fwad.unpack_dual(output)
            added = (x @ v.to(x.dtype).T) @ u.to(x.dtype).T
            return fwad.make_dual(primal, added if tangent is None else tangent + added)

        return hook

    handles = []
    try:
        with fwad.dual_level():
            for name, owner in owners.items():
                u, v = update.factors[name]
                device = owner.weight.device if owner.weight.device.type != "meta" else u.device
                handles.append(owner.register_forward_hook(make_hook(u.to(device), v.to(device))))
            kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.kwargs}
            # Forward AD has no rule for the fused SDPA kernels; the math kernel has one.
            with sdpa_kernel(SDPBackend.MATH):
                out = model(**kwargs)
            logits = out.logits if hasattr(out, "logits") else out
            derivative = fwad.unpack_dual(_episode_token_logprobs(logits, batch)).tangent
    finally:
        for handle in handles:
            handle.remove()
    if derivative is None:  # no proxy layer took part in the forward
        return torch.zeros(int(batch.valid.sum()), device=batch.input_ids.device)
    return derivative


def _is_missing_forward_ad(err: Exception) -> bool:
    # NotImplementedError: an aten op or a setup_context-style autograd.Function without a jvp rule;
    # RuntimeError: an old-style autograd.Function (forward(ctx, ...), e.g. flash_attn's), which
    # functorch transforms refuse outright.
    return isinstance(err, NotImplementedError) or "functorch transforms" in str(err)


def _no_forward_ad(err: Exception) -> RuntimeError:
    return RuntimeError(
        f"forward-mode AD (torch.func.jvp) is not supported by an op of this model: {err}. "
        "Use method='finite_difference', or an attention implementation with forward-AD support "
        "('eager' or 'sdpa'; flash_attention_2 has none) when a proxy matrix precedes an attention layer."
    )


def _directional_derivatives_fd(
    model: nn.Module, update: LowRankUpdate, batch: _Batch, eps: float | None
) -> Tensor:
    params = dict(model.named_parameters())
    model_dtype = params[update.names[0]].dtype
    if eps is None:
        # Central differences balance O(h^2) truncation against rounding/h: h ~ cbrt(machine eps)
        # of the precision the logits are computed in (fp32: 5e-3, bf16: 0.2, fp64: 6e-6).
        eps = torch.finfo(model_dtype).eps ** (1.0 / 3.0)
    norm = update.sq_norm().sqrt()
    owners: dict[int, nn.Module] = {}
    for name in update.names:
        owner = _proxy_owner(model, name)
        owners[id(owner)] = owner
    # The P modules run in fp32 (fp64 for fp64 weights): in bf16, W + eps * dW_r would round to W.
    compute = _compute_dtype(model_dtype)
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
            results.append(_episode_token_logprobs(_logits(model, overrides, batch), batch))
    plus, minus = results
    # d/de f(W + e dW_r) = ||dW_r|| * d/ds f(W + s dW_r / ||dW_r||)
    return (plus - minus) * (norm.to(plus.dtype) / (2.0 * step))


def _result_dtype(model: nn.Module, update: LowRankUpdate) -> torch.dtype:
    p = dict(model.named_parameters())[update.names[0]]
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def episode_penalties(
    model: nn.Module,
    update: LowRankUpdate,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    episode_ids: Tensor,
    damping: float = DEFAULT_DAMPING,
    *,
    method: PenaltyMethod = "jvp",
    eps: float | None = None,
    position_ids: Tensor | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    k_max: int | None = None,
) -> Tensor:
    """Raw penalties ``p_k = <dW_r, g_k>^2 + damping * ||dW_r||^2`` (docs/method.md §3), shape ``[B, K_max]``.

    ``episode_ids`` ``[B, T]``: ``k >= 0`` marks the tokens of episode k (position t's log-prob is
    predicted from logits at t - 1, so ``episode_ids[:, 0]`` must be -1), ``-1`` elsewhere.
    ``K_max = episode_ids.max() + 1`` unless ``k_max`` fixes a (larger) width. Slots of episodes a
    sample does not have are 0; ``K_max = 0`` gives ``[B, 0]`` without running the model.

    ``method``:
      - ``"jvp"``: ONE forward-mode JVP (``torch.func.jvp`` over ``functional_call``, tangent
        ``dW_r`` on P only) gives ``<dW_r, grad log pi(z_t | z_<t)>`` for every token; a
        scatter_add sums them per episode. One forward whatever K. Every op a tangent reaches needs
        a forward-AD rule: fused SDPA kernels have none, so when a proxy precedes an attention layer
        the call is retried once under the math SDPA kernel; other gaps (flash_attn) raise a
        RuntimeError pointing to ``"finite_difference"``.
      - ``"forward_ad"``: the same single forward-mode pass, with the tangent injected by forward hooks
        at the proxy layers' outputs (``x dW_r^T``) instead of by replacing the weights. Needs the
        proxies to be ``nn.Linear`` weights; works on FSDP2-sharded models (the actor's path).
      - ``"finite_difference"``: central difference, two forwards at ``W -+ h * dW_r / ||dW_r||``
        with ``h = eps * max(||W_P||_F, 1)`` (a step relative to the proxy weights, not to the
        update, whose size is set by the learning rate), the P modules run in fp32 (fp64 for fp64
        weights). ``eps=None`` picks ``cbrt(finfo(model dtype).eps)``. For ops without forward-AD
        rules (e.g. flash-attention kernels). Accuracy per penalty on the tiny test model: ~1e-8
        relative in fp64, <1e-2 in fp32; in bf16 the rest of the network quantises the difference of
        the two forwards (errors of 10% and more): prefer ``"jvp"`` for bf16 models.

    ``position_ids`` / ``forward_kwargs`` are passed to the model's forward (e.g. position ids of a
    left-padded batch, ``use_cache=False``). The model runs in eval mode under ``torch.no_grad``;
    its parameters, buffers and training flags are left as they were. The result is fp32 (fp64 for
    fp64 models); non-finite values are returned as they are (the caller counts them).
    """
    if not damping >= 0.0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if method not in ("jvp", "forward_ad", "finite_difference"):
        raise ValueError(
            f"unknown penalty method {method!r}; expected 'jvp', 'forward_ad' or 'finite_difference'"
        )
    if method == "finite_difference" and eps is not None and not eps > 0.0:
        raise ValueError(f"finite-difference eps must be > 0, got {eps}")
    batch = _prepare(
        model, update, input_ids, attention_mask, episode_ids, position_ids, forward_kwargs, k_max
    )
    dtype = _result_dtype(model, update)
    if batch.num_episodes == 0 or update.is_zero:
        # No episode, or no update: p_k = 0^2 + damping * 0 = 0 exactly; no forward needed.
        return torch.zeros(batch.exists.shape, dtype=dtype, device=input_ids.device)

    with torch.no_grad(), _eval_mode(model):
        if method == "jvp":
            per_token = _directional_derivatives_jvp(model, update, batch)
        elif method == "forward_ad":
            per_token = _directional_derivatives_forward_ad(model, update, batch)
        else:
            per_token = _directional_derivatives_fd(model, update, batch, eps)
    inner = _segment_sum(per_token.to(dtype), batch)  # <dW_r, g_k>
    reg = damping * update.sq_norm().to(device=inner.device, dtype=dtype)
    return torch.where(batch.exists, inner.square() + reg, torch.zeros_like(inner))


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
        token_lp = _episode_token_logprobs(_logits(model, proxy, batch), batch)
        for b, k in batch.exists.nonzero().tolist():
            selected = batch.slot == b * batch.num_episodes + k
            grads = torch.autograd.grad(token_lp[selected].sum(), list(proxy.values()), retain_graph=True)
            g = torch.cat([grad.to(dtype).flatten() for grad in grads])
            fisher = torch.outer(g, g) + damping * identity
            penalties[b, k] = (dtheta @ fisher @ dtheta).detach()
    return penalties
