"""A padded micro-batch of episode tokens, and how micro-batches are cut (docs/method.md §3).

:class:`TokenBatch` says where a micro-batch's episode tokens are (the penalty only ever scores those);
:func:`prepare_batch` validates the inputs once and builds it; :func:`token_budget_groups` cuts a batch into
micro-batches by a padded-token budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from l2t_verl.penalty.proxy import LowRankUpdate

__all__ = [
    "TokenBatch",
    "eval_mode",
    "episode_penalty_values",
    "micro_batch_rows",
    "prepare_batch",
    "result_dtype",
    "segment_sum",
    "token_batch",
    "token_budget_groups",
]


@dataclass(frozen=True)
class TokenBatch:
    """A padded micro-batch and where its episode tokens are."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    kwargs: dict[str, Any]  # extra forward kwargs (position_ids, use_cache, ...)
    valid: Tensor  # [B, T-1] bool: logits position t-1 predicts an episode token t
    slot: Tensor  # [N] flat index b * K + k of every valid token, in ``valid`` order
    exists: Tensor  # [B, K] bool: sample b has episode k
    num_episodes: int

    @property
    def targets(self) -> Tensor:
        """The N episode tokens, in ``valid`` order."""
        return self.input_ids[:, 1:][self.valid]


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


def micro_batch_rows(attention_mask: Tensor, max_tokens: int | None) -> list[tuple[list[int], int]]:
    """A padded batch's micro-batches: each one's rows (:func:`token_budget_groups`, or every row when
    ``max_tokens`` is None) and its width, the longest of its rows by ``attention_mask`` (at least 1)."""
    last = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device) * (attention_mask != 0)
    lengths = last.max(dim=1).values.tolist()
    groups = [list(range(len(lengths)))] if max_tokens is None else token_budget_groups(lengths, max_tokens)
    return [(rows, max(max(lengths[i] for i in rows), 1)) for rows in groups]


def prepare_batch(
    model: nn.Module,
    update: LowRankUpdate,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    episode_ids: Tensor,
    position_ids: Tensor | None,
    forward_kwargs: Mapping[str, Any] | None,
    k_max: int | None,
) -> TokenBatch:
    """Validate the inputs (one error naming what is wrong) and locate the episode tokens."""
    params = dict(model.named_parameters())
    for name in update.names:
        if name not in params:
            raise ValueError(f"proxy parameter {name!r} of the update is not a parameter of the model")
        if tuple(params[name].shape) != tuple(update.shape(name)):
            raise ValueError(
                f"update for {name!r} has shape {tuple(update.shape(name))}, the parameter has "
                f"{tuple(params[name].shape)}"
            )
    return token_batch(input_ids, attention_mask, episode_ids, position_ids, forward_kwargs, k_max)


def token_batch(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    episode_ids: Tensor,
    position_ids: Tensor | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    k_max: int | None = None,
) -> TokenBatch:
    """Validate a padded batch and its episode ids (one error naming what is wrong) and locate the
    episode tokens; :func:`prepare_batch` without the model (an engine whose parameter names differ
    from the update's, e.g. Megatron's)."""
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
def eval_mode(model: nn.Module) -> Iterator[None]:
    # Dropout would make the derivative random; restore each submodule's own flag afterwards, since
    # model.train(mode) would overwrite mixed states.
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in states:
            module.training = training


def result_dtype(model: nn.Module, update: LowRankUpdate) -> torch.dtype:
    p = dict(model.named_parameters())[update.names[0]]
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def segment_sum(values: Tensor, batch: TokenBatch) -> Tensor:
    """Per-episode sums ``[B, K]`` of per-token values ``[N]`` (one scatter_add, any K)."""
    out = values.new_zeros(batch.exists.numel())
    out.scatter_add_(0, batch.slot, values)
    return out.view_as(batch.exists)


def episode_penalty_values(per_token: Tensor, batch: TokenBatch, reg: float) -> Tensor:
    """``p_k = <dW_r, g_k>^2 + reg`` ``[B, K]`` from the N per-token directional derivatives (docs/method.md
    §3), with ``reg = damping * ||dW_r||^2``; 0 in the slots of episodes a sample does not have."""
    inner = segment_sum(per_token, batch)  # <dW_r, g_k>
    return torch.where(batch.exists, inner.square() + reg, torch.zeros_like(inner))
