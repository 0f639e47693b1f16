"""Length-penalty baseline (the paper's "+length penalty" rows) as a verl reward manager.

Selected by ``algo=length_penalty`` (``config/algo/length_penalty.yaml``: GRPO advantage, stock single-turn
agent loop, this reward manager registered as ``length_penalty``). Settings live under
``length_penalty:`` and are validated at start-up (:func:`check_length_penalty`, called from
``l2t_verl.main.prepare_config``).

The form. The paper's baseline cites Arora & Zanette, "Training Language Models to Reason Efficiently"
(arXiv:2502.04463), whose reward is ``1{correct} * (1 - coef * sigmoid(z))`` with ``z`` the response
length normalised by the mean and std of the lengths of the *correct* responses in the prompt's group.
verl 0.9.1's v1 trainer scores every trajectory on its own, inside the rollout worker
(``AgentLoopWorker._compute_score`` -> ``RewardManagerBase.run_single``), so a reward manager never sees
the group. This manager keeps that reward's structure -- only correct answers pay for length, the pay
grows with length, a correct answer never scores below a wrong one -- with the group statistics replaced
by the fixed token budget ``L_max``::

    frac    = min(L, L_max) / L_max                      L = valid response tokens
    penalty = coef * r_out * frac     (correct_only: true, default)
    penalty = coef * frac             (correct_only: false: the plain linear cost r_out - coef * L / L_max)
    reward  = r_out - penalty

``r_out`` is the outcome verifier's score in [0, 1] (binary for math and code), so with
``correct_only`` the reward is ``r_out * (1 - coef * frac)``. The reward goes on the last response token
and GRPO normalises it within the prompt group, as for the GRPO baseline. Verifier failures score 0 and
are counted, exactly as in the ``l2t`` reward manager this class extends (docs/method.md §8).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager.registry import register

from l2t_verl.reward_manager import L2TRewardManager
from l2t_verl.settings import L2TConfigError

__all__ = [
    "LengthPenaltyConfig",
    "LengthPenaltyConfigError",
    "LengthPenaltyRewardManager",
    "check_length_penalty",
    "length_penalized_reward",
]

REWARD_MANAGER_NAME = "length_penalty"


class LengthPenaltyConfigError(L2TConfigError):
    """A bad ``length_penalty.*`` setting; the message starts with the full key.

    A subclass of :class:`L2TConfigError` so that ``l2t_verl.main`` reports it as the same one-line error.
    """


@dataclass(frozen=True)
class LengthPenaltyConfig:
    coef: float = 0.2
    max_length: int | None = None  # None: data.max_response_length
    correct_only: bool = True

    def validate(self) -> LengthPenaltyConfig:
        if isinstance(self.coef, bool) or not isinstance(self.coef, (int, float)) or not 0 <= self.coef <= 1:
            raise LengthPenaltyConfigError(
                f"length_penalty.coef must be a number in [0, 1]; got {self.coef!r}"
            )
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1
        ):
            raise LengthPenaltyConfigError(
                f"length_penalty.max_length must be an integer >= 1 or null; got {self.max_length!r}"
            )
        if not isinstance(self.correct_only, bool):
            raise LengthPenaltyConfigError(
                f"length_penalty.correct_only must be true or false; got {self.correct_only!r}"
            )
        return self

    @classmethod
    def from_config(cls, config: Any) -> LengthPenaltyConfig:
        """Build from a full trainer config (reads ``length_penalty`` and ``data.max_response_length``)."""
        node = _get(config, "length_penalty")
        node = {} if node is None else dict(node)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise LengthPenaltyConfigError(f"length_penalty.{unknown[0]} is not a known setting")
        if node.get("max_length") is None:
            # The budget the rollout enforces: no response is longer, so frac spans [0, 1].
            node["max_length"] = _get(_get(config, "data"), "max_response_length")
        return cls(**node).validate()


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    getter = getattr(node, "get", None)
    return getter(key) if getter is not None else getattr(node, key, None)


def length_penalty_selected(config: Any) -> bool:
    manager = _get(_get(config, "reward"), "reward_manager")
    return _get(manager, "name") == REWARD_MANAGER_NAME


def check_length_penalty(config: Any) -> LengthPenaltyConfig | None:
    """Start-up check: the validated settings when the ``length_penalty`` reward manager is selected,
    else ``None`` (the ``length_penalty`` node, if any, is then unused)."""
    if not length_penalty_selected(config):
        return None
    cfg = LengthPenaltyConfig.from_config(config)
    if cfg.max_length is None:
        raise LengthPenaltyConfigError(
            "length_penalty.max_length must be set when data.max_response_length is missing"
        )
    return cfg


def length_penalized_reward(
    outcome: float, length: int, max_length: int, coef: float, correct_only: bool = True
) -> tuple[float, float]:
    """``(reward, penalty)`` of one response; see the module docstring for the formula."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1; got {max_length}")
    if length < 0:
        raise ValueError(f"length must be >= 0; got {length}")
    frac = min(length, max_length) / max_length
    penalty = coef * frac * (outcome if correct_only else 1.0)
    return outcome - penalty, penalty


@register(REWARD_MANAGER_NAME)
class LengthPenaltyRewardManager(L2TRewardManager):
    """Outcome verifier (inherited from the ``l2t`` manager: timeout, counted failures) minus a length cost.

    ``reward_extra_info`` keeps a fixed key set, as verl requires: the inherited ``acc``, ``l2t_outcome``,
    ``l2t_verifier_error`` (``acc`` stays the verifier's score, so accuracy is comparable across
    baselines) plus ``length_penalty`` (the amount subtracted) and ``response_length``.
    ``assemble_rm_scores`` is verl's own: the reward on the last valid response token.
    """

    def __init__(self, config: Any, tokenizer: Any, compute_score: Any, **kwargs: Any) -> None:
        super().__init__(config, tokenizer, compute_score, **kwargs)
        self.length_penalty = LengthPenaltyConfig.from_config(config)
        if self.length_penalty.max_length is None:
            raise LengthPenaltyConfigError(
                "length_penalty.max_length must be set when data.max_response_length is missing"
            )

    async def run_single(self, data: DataProto) -> dict:
        result = await super().run_single(data)
        item = data[-1:][0]
        width = item.batch["responses"].shape[-1]
        length = int(item.batch["attention_mask"][-width:].sum())
        outcome = float(result["reward_score"])
        cfg = self.length_penalty
        reward, penalty = length_penalized_reward(
            outcome, length, cfg.max_length, cfg.coef, correct_only=cfg.correct_only
        )
        result["reward_score"] = reward
        result["reward_extra_info"].update({"length_penalty": penalty, "response_length": length})
        return result
