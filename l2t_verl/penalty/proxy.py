"""The proxy of the parameter update in L2T's compression penalty (docs/method.md §3).

Two small objects: the proxy set P (the weight matrices the penalty looks at, chosen by a regex over
parameter names; by default the last decoder layer's MLP, the paper's "single-layer MLP") and
:class:`LowRankUpdate`, the rank-r truncated SVD ``dW_r = U V`` of each matrix's update
``dW = W_now - W_ref``. The penalty itself (:mod:`l2t_verl.penalty.fisher`) only reads these.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_DAMPING",
    "EXACT_SVD_MAX_NUMEL",
    "LowRankUpdate",
    "decoder_layer_indices",
    "last_layer_mlp_regex",
    "mlp_regex",
    "proxy_regex",
    "random_layer_regex",
    "select_proxy_params",
]

DEFAULT_DAMPING = 1e-5
"""Fisher damping lambda of the paper (App. E): the penalty's ``lambda ||dW_r||^2`` term."""

EXACT_SVD_MAX_NUMEL = 1 << 22
"""``svd="auto"`` uses the exact ``torch.linalg.svd`` for matrices with at most this many entries
(4M: e.g. 1024 x 4096) and a seeded randomized SVD above it, where a full SVD of, say, a
1536 x 8960 MLP matrix costs far more than the rank-r factors need."""

_RSVD_OVERSAMPLE = 10
_RSVD_POWER_ITERS = 4
_LAYER_INDEX_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

SvdMethod = Literal["auto", "exact", "randomized"]


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


def mlp_regex(layers: list[int]) -> str:
    """Regex for the MLP weights of the given decoder layers (Hugging Face names ``...layers.<i>.mlp.``)."""
    alternatives = "|".join(str(i) for i in layers)
    return rf"(?:^|\.)layers\.(?:{alternatives})\.mlp\."


def last_layer_mlp_regex(model: nn.Module) -> str:
    """Regex for the MLP weights of the last decoder layer: the spec's default proxy set (the paper's
    "single-layer MLP")."""
    layers = decoder_layer_indices(model)
    if not layers:
        raise ValueError("no decoder layers found: no parameter name contains 'layers.<i>.'")
    regex = mlp_regex(layers[-1:])
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
    regex = mlp_regex(picked)
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
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
        deltas: dict[str, Tensor] = {}
        for name, weight in current.items():
            if name not in reference:
                raise KeyError(f"reference has no tensor for proxy parameter {name!r}")
            ref = reference[name]
            if tuple(ref.shape) != tuple(weight.shape):
                raise ValueError(
                    f"reference for proxy parameter {name!r} has shape {tuple(ref.shape)}, "
                    f"the parameter has {tuple(weight.shape)}"
                )
            dtype = compute_dtype(weight.dtype)
            with torch.no_grad():
                deltas[name] = weight.detach().to(dtype) - ref.detach().to(device=weight.device, dtype=dtype)
        return cls.from_deltas(deltas, rank, svd=svd, seed=seed)

    @classmethod
    def from_deltas(
        cls, deltas: Mapping[str, Tensor], rank: int, *, svd: SvdMethod = "auto", seed: int = 0
    ) -> LowRankUpdate:
        """Build ``dW_r`` from the updates ``dW`` themselves (fp32 or fp64), one seeded truncated SVD per
        matrix: every rank that holds the same ``dW`` gets the same factors."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if not deltas:
            raise ValueError("no proxy matrices given")
        if svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"unknown svd method {svd!r}; expected 'auto', 'exact' or 'randomized'")
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        for name, delta in deltas.items():
            if delta.ndim != 2:
                raise ValueError(f"proxy parameter {name!r} is not 2-D (shape {tuple(delta.shape)})")
            with torch.no_grad():
                delta = delta.detach().to(compute_dtype(delta.dtype))
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
            dtype = compute_dtype(p.dtype)
            factors[name] = (p.new_zeros(m, r, dtype=dtype), p.new_zeros(r, n, dtype=dtype))
        return cls(factors=factors, rank=rank)
