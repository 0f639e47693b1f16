"""The ``l2t`` trainer: verl's synchronous v1 PPO trainer with the L2T steps added (spec 3-5, 7).

One training step, in verl's order (``PPOTrainer._step_once``):

1. rollout  — agent loop ``l2t`` (:mod:`l2t_verl.agent_loop`, rollout workers): generate, cut into
   episodes, probe J_r at every boundary; results ride along as ``extra_fields.l2t_*``;
2. reward   — the outcome verifier gives ``r_out`` (on the last token of ``rm_scores``);
3. old log-prob — as in verl;
4. **penalty** — :meth:`L2TTrainer._compute_penalty`: the actor workers
   (:class:`~l2t_verl.worker_extension.L2TActorRolloutRefWorker`) return the raw Fisher penalties
   ``p_k`` per episode of their own samples;
5. **advantage** — :meth:`L2TTrainer._compute_advantage`: ``p_hat = p / mean(p)``,
   ``r_k = dJ_k - beta * p_hat_k``, dense rewards ``r_out`` (last token) + ``alpha * r_k`` (episode k's
   last token), then the ``l2t`` estimator (:func:`l2t_verl.advantage.compute_l2t_advantage`);
6. actor update — as in verl (the worker first keeps P's pre-update copy as the next reference).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import transfer_queue as tq
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.debug import marked_timer
from verl.workers.utils.padding import response_to_nested

from l2t_verl.advantage import compute_l2t_advantage
from l2t_verl.episodes import episode_ids_for
from l2t_verl.rewards import dense_token_rewards, normalize_penalties
from l2t_verl.settings import L2TConfig
from l2t_verl.worker_extension import (
    EPISODE_IDS_KEY,
    PENALTY_KEY,
    PENALTY_SETTINGS_KEY,
    L2TActorRolloutRefWorker,
)

_ACTOR_ROLES = (Role.ActorRollout, Role.ActorRolloutRef, Role.Actor)


def _valid_ends(ends: Any, response_len: int) -> list[int]:
    """Episode ends as the agent loop wrote them; anything inconsistent counts as no episode."""
    values = [int(e) for e in (ends or [])]
    if (
        values
        and all(b > a for a, b in zip([0, *values], values, strict=False))
        and values[-1] <= response_len
    ):
        return values
    return []


def _extra(fields: Any, n: int) -> list[dict]:
    """The per-sample ``extra_fields`` dicts as read back from TransferQueue."""
    if fields is None:
        return [{} for _ in range(n)]
    fields = fields.tolist() if hasattr(fields, "tolist") else list(fields)
    return [dict(f) if isinstance(f, dict) else {} for f in fields]


@register_trainer("l2t")
class L2TTrainer(PPOTrainerSync):
    def __init__(self, config) -> None:
        self.l2t = L2TConfig.from_config(config)
        super().__init__(config)

    # verl selects a trainer class by ``trainer.v1.trainer_mode`` and then branches on
    # ``trainer_mode == "sync"`` (replay buffer, refill of failed groups, TransferQueue checkpoints,
    # the ``trainer.v1.sync`` settings). Registered as "l2t", this is still the synchronous loop, so it
    # reports "sync" to those branches; verl's own assignment in ``__init__`` is ignored.
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        pass

    # ------------------------------------------------------------------ workers

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        # Same hybrid worker as verl's, plus the penalty; swapped in rather than patched.
        for role in _ACTOR_ROLES:
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(L2TActorRolloutRefWorker)

    # ------------------------------------------------------------------ step

    def _compute_old_log_prob(self, batch, metrics: dict):
        batch = super()._compute_old_log_prob(batch, metrics)
        with marked_timer("l2t_penalty", self.timing_raw, color="purple"):
            batch = self._compute_penalty(batch, metrics)
        return batch

    def _episode_ends(self, batch) -> tuple[list[list[int]], list[dict], torch.Tensor]:
        """Episode ends, the raw ``extra_fields`` and the response lengths of every sample."""
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields", "response_mask"]
        )
        extras = _extra(data.get("extra_fields", None), len(batch))
        lengths = data["response_mask"].offsets().diff()
        ends = [
            _valid_ends(x.get("l2t_episode_ends"), n) for x, n in zip(extras, lengths.tolist(), strict=True)
        ]
        return ends, extras, lengths

    def _compute_penalty(self, batch, metrics: dict):
        k_max = self.l2t.episodes.max_episodes
        if not self.l2t.penalty_active:
            return batch
        start = time.perf_counter()
        ends, _, lengths = self._episode_ends(batch)
        episode_ids = torch.nested.as_nested_tensor(
            [
                torch.tensor(episode_ids_for(int(n), e), dtype=torch.long)
                for n, e in zip(lengths.tolist(), ends, strict=True)
            ],
            layout=torch.jagged,
        )
        tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=TensorDict({EPISODE_IDS_KEY: episode_ids}, batch_size=len(batch)),
        )
        penalty = self.l2t.penalty
        settings = {
            "proxy": penalty.proxy,
            "modules": penalty.modules,
            "rank": penalty.rank,
            "damping": penalty.damping,
            "reference": penalty.reference,
            "random_fraction": penalty.random_fraction,
            "seed": penalty.seed,
            "max_episodes": k_max,
            "micro_batch_size": self.config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu,
        }
        # The worker reads exactly these fields of the batch (a view: the TQ data is not copied).
        view = KVBatchMeta(
            keys=batch.keys,
            tags=batch.tags,
            partition_id=batch.partition_id,
            fields=["input_ids", "position_ids", EPISODE_IDS_KEY],
            extra_info=dict(batch.extra_info),
        )
        view.extra_info[PENALTY_SETTINGS_KEY] = settings
        self.actor_rollout_wg.compute_l2t_penalty(view)
        metrics["l2t/penalty_time_s"] = time.perf_counter() - start
        return batch

    def _compute_advantage(self, batch, metrics: dict):
        fields = ["uid", "response_mask", "rm_scores"] + (["input_ids"] if self.l2t.dump_dir else [])
        if self.l2t.penalty_active:
            fields.append(PENALTY_KEY)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        response_mask_nested = data["response_mask"]
        sequences = data.pop("input_ids") if self.l2t.dump_dir else None
        padded = data.to_padded_tensor()
        uid = np.array(padded.pop("uid").tolist(), dtype=object)
        response_mask = padded["response_mask"]
        scores = padded["rm_scores"].float()
        ends, extras, lengths = self._episode_ends(batch)
        outcome = self._outcomes(extras, scores, lengths)

        k_max = self.l2t.episodes.max_episodes
        n = len(batch)
        exists = torch.zeros(n, k_max, dtype=torch.bool)
        delta_j = torch.zeros(n, k_max)
        for i, (x, e) in enumerate(zip(extras, ends, strict=True)):
            exists[i, : len(e)] = True
            dj = x.get("l2t_delta_j") or []
            if self.l2t.progress_active and len(dj) == len(e):
                delta_j[i, : len(e)] = torch.tensor(dj, dtype=torch.float32)
        if self.l2t.penalty_active:
            raw = padded[PENALTY_KEY].float()[:, :k_max]
            p_hat, nonfinite = normalize_penalties(raw, exists, self.l2t.penalty.normalize)
            raw = torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw))
        else:
            raw = p_hat = torch.zeros(n, k_max)
            nonfinite = 0
        # Spec 8: a response whose probes failed gets no process reward at all (outcome only).
        failed = torch.tensor([self.l2t.progress_active and bool(x.get("l2t_probe_failed")) for x in extras])
        rewarded = exists & ~failed[:, None]
        process = torch.where(rewarded, delta_j - self.l2t.beta * p_hat, torch.zeros_like(delta_j))

        # Dense token rewards (spec 4): r_out on the last valid token, alpha * r_k on episode k's last.
        rewards = torch.zeros_like(scores)
        for i, (e, length) in enumerate(zip(ends, lengths.tolist(), strict=True)):
            rewards[i, :length] = dense_token_rewards(
                length, e, float(outcome[i]), process[i, : len(e)].tolist(), self.l2t.alpha
            )
        advantages, returns = compute_l2t_advantage(
            token_level_rewards=rewards,
            response_mask=response_mask,
            index=uid,
            config=self.config.algorithm,
            outcome_scores=outcome,
        )
        output = {
            "advantages": response_to_nested(advantages, response_mask_nested),
            "returns": response_to_nested(returns, response_mask_nested),
        }
        batch = tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(output, batch_size=n)
        )
        metrics.update(
            self._l2t_metrics(extras, ends, exists, raw, p_hat, process, outcome, lengths, nonfinite)
        )
        if sequences is not None:
            self._dump(sequences, uid, ends, extras, outcome, raw, p_hat, advantages, response_mask)
        return batch

    def _dump(self, sequences, uid, ends, extras, outcome, raw, p_hat, advantages, response_mask) -> None:
        """One JSON line per sample to ``l2t.dump_dir/step_N.jsonl``. ``sequence_sha1`` (of prompt +
        response token ids) identifies a sample across runs, where verl's ``uid`` is random."""
        folder = Path(self.l2t.dump_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rows = sequences.unbind(0) if sequences.is_nested else list(sequences)
        with (folder / f"step_{self.global_steps}.jsonl").open("w") as fh:
            for i, (seq, e, x) in enumerate(zip(rows, ends, extras, strict=True)):
                tokens = seq.reshape(-1).tolist()
                record = {
                    "uid": str(uid[i]),
                    "sequence_sha1": hashlib.sha1(json.dumps(tokens).encode()).hexdigest(),
                    "response_tokens": int(response_mask[i].sum()),
                    "episode_ends": e,
                    "jr": x.get("l2t_jr") or [],
                    "delta_j": x.get("l2t_delta_j") or [],
                    "probe_failed": bool(x.get("l2t_probe_failed")),
                    "outcome": float(outcome[i]),
                    "penalty_raw": raw[i, : len(e)].tolist(),
                    "penalty_hat": p_hat[i, : len(e)].tolist(),
                    "advantages": advantages[i][response_mask[i].bool()].tolist(),
                }
                fh.write(json.dumps(record) + "\n")

    @staticmethod
    def _outcomes(extras: list[dict], scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """r_out per sample: the ``l2t`` reward manager's ``l2t_outcome``; with any other manager, the
        scalar verl put on the last response token."""
        last = scores[torch.arange(len(extras)), (lengths - 1).clamp(min=0)]
        values = []
        for i, x in enumerate(extras):
            info = x.get("reward_extra_info") or {}
            values.append(float(info["l2t_outcome"]) if "l2t_outcome" in info else float(last[i]))
        return torch.tensor(values, dtype=torch.float32)

    def _l2t_metrics(self, extras, ends, exists, raw, p_hat, process, outcome, lengths, nonfinite) -> dict:
        """Spec 7: what every step reports under ``l2t/``."""
        k = torch.tensor([len(e) for e in ends], dtype=torch.float32)
        jr = [x.get("l2t_jr") or [] for x in extras]
        dj = [d for x in extras for d in (x.get("l2t_delta_j") or [])]
        probed = [j for j in jr if j]
        held = exists.sum().clamp(min=1)

        def mean(values) -> float:
            return float(np.mean(values)) if len(values) else 0.0

        return {
            "l2t/episodes_per_response/mean": float(k.mean()),
            "l2t/episodes_per_response/max": float(k.max()) if len(k) else 0.0,
            "l2t/jr_first": mean([j[0] for j in probed]),
            "l2t/jr_last": mean([j[-1] for j in probed]),
            "l2t/delta_jr_mean": mean(dj),
            "l2t/penalty_raw_mean": float((raw * exists).sum() / held),
            "l2t/penalty_mean": float((p_hat * exists).sum() / held),
            "l2t/process_reward_mean": float((process * exists).sum() / held),
            "l2t/outcome_acc": float(outcome.mean()),
            "l2t/response_tokens_mean": float(lengths.float().mean()),
            "l2t/probe_tokens_per_response": mean([x.get("l2t_probe_tokens", 0) for x in extras]),
            "l2t/probe_time_s": float(sum(x.get("l2t_probe_time_s", 0.0) for x in extras)),
            "l2t/probe_failures": float(sum(bool(x.get("l2t_probe_failed")) for x in extras)),
            "l2t/verifier_errors": float(
                sum(int(x.get("l2t_verifier_errors", 0)) for x in extras)
                + sum(int((x.get("reward_extra_info") or {}).get("l2t_verifier_error", 0)) for x in extras)
            ),
            "l2t/penalty_nonfinite": float(nonfinite),
        }
