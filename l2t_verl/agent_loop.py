"""The ``l2t`` agent loop: verl's single-turn rollout plus episode segmentation and J_r probes.

Select it with ``actor_rollout_ref.rollout.agent.default_agent_loop=l2t`` (verl uses that name for
every row without an ``agent_name`` column; a dataset row's ``agent_name`` overrides it per row).

Per response (L2T_SPEC.md sections 1-2, 8):

1. generate exactly as verl's ``single_turn_agent`` does (chat template, one request);
2. when ``l2t.enable``: cut the response into episodes (``l2t.episodes``) on its own token ids;
3. when ``l2t.progress.enable`` too: send the K+1 J_r probes to the SAME server, through the same
   ``server_manager`` with the generation's request id, so the load balancer's sticky session
   routes them to the replica whose prefix cache holds the response (``l2t_verl.progress``);
4. write the results into ``AgentLoopOutput.extra_fields``:

   ======================  ===========  ==================================================
   key                     type         meaning
   ======================  ===========  ==================================================
   ``l2t_episode_ends``    list[int]    exclusive END token index of each episode (K)
   ``l2t_jr``              list[float]  J_r before episode 1 .. after episode K (K+1), or []
   ``l2t_delta_j``         list[float]  delta_J_k (K), or [] (K = 0, progress off, failure)
   ``l2t_probe_failed``    bool         a probe failed: this response gets outcome only
   ``l2t_probe_error``     str | None   why
   ``l2t_probe_tokens``    int          tokens the server computed for the probes
   ``l2t_probe_time_s``    float        probe wall time for this response
   ``l2t_verifier_errors`` int          verifier errors inside sampling probes
   ``l2t_alpha``           float        ``l2t.alpha`` (the reward manager places alpha*delta_J)
   ======================  ===========  ==================================================

Where the fields land (verl 0.9.1; read from ``verl/experimental/agent_loop/agent_loop.py``,
``verl/trainer/ppo/v1/agent_loop_tq.py``, ``verl/experimental/reward_loop/``):

- Reward manager input. With rule-based rewards (no reward model, or one on its own resource
  pool) verl computes rewards INSIDE the rollout worker, per sample, right after ``run()``:
  ``AgentLoopWorker._compute_score`` builds a one-row ``DataProto`` whose ``non_tensor_batch``
  holds the dataset row's fields (``data_source``, ``reward_model``, ``extra_info``,
  ``raw_prompt``, ``uid``, ...) plus ``tool_extra_fields`` = this ``extra_fields`` dict, and
  calls ``RewardManager.run_single`` on it. Its ``reward_score`` becomes
  ``AgentLoopOutput.reward_score`` and its ``reward_extra_info`` becomes
  ``extra_fields["reward_extra_info"]``. ``assemble_rm_scores`` is NOT called on this path: it
  only runs in ``RewardLoopManager.compute_rm_score`` (the non-streaming path; in the v1
  trainer that path passes only ``raw_prompt``, so no ``l2t_*`` field reaches it).
- Trainer batch, v1 (TransferQueue) path, the one ``l2t_verl.main`` runs:
  ``AgentLoopWorkerTQ._agent_loop_postprocess`` stores ``output.as_dict()`` plus the row's fields
  per sample. ``rm_scores`` (nested, one row per response) is ``reward_score`` (= ``r_out`` with
  the ``l2t`` reward manager) on the last response token, zeros elsewhere. All of
  ``extra_fields`` (the ``l2t_*`` keys, and ``reward_extra_info`` with ``l2t_outcome`` /
  ``l2t_verifier_error`` / ``acc``) is kept as ONE per-sample dict in the TransferQueue field
  ``"extra_fields"``: ``tq.kv_batch_get(..., select_fields=["extra_fields"])["extra_fields"]``
  iterates as a list of dicts (``list(...)`` it). The dense reward is therefore built by the
  driver from these fields (``l2t_verl.trainer``), with the same placement as
  ``l2t_verl.reward_manager.dense_response_rewards``.
- Trainer batch, legacy ``AgentLoopWorker._postprocess`` (``DataProto``): every ``extra_fields``
  key becomes its own ``non_tensor_batch`` column (object arrays: ``l2t_episode_ends``, ...),
  and every ``reward_extra_info`` key becomes a column too (``l2t_outcome``, ...). ``rm_scores``
  there is verl's scalar-on-last-token when rewards streamed; on the non-streaming path the
  ``l2t`` reward manager's ``assemble_rm_scores`` reads the ``l2t_*`` columns and makes it dense.

Probe requests bypass ``FullyAsyncLLMServerClient``'s resume loop (it rebuilds the reply and drops
``prompt_logprobs``): they go through the base ``LLMServerClient.generate`` of the same client.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient, LLMServerClient

from l2t_verl import faults
from l2t_verl.episodes import segment_episodes
from l2t_verl.progress import ProgressResult, compute_progress
from l2t_verl.settings import L2TConfig, L2TConfigError

__all__ = ["L2T_AGENT_LOOP", "L2TAgentLoop", "l2t_config_of"]

logger = logging.getLogger(__name__)

L2T_AGENT_LOOP = "l2t"

_CONFIG_CACHE: dict[int, tuple[Any, L2TConfig]] = {}


def l2t_config_of(trainer_config: Any) -> L2TConfig:
    """The validated ``l2t`` settings of a trainer config (cached per config object: verl builds
    one agent-loop object per sample, all sharing the worker's config)."""
    cached = _CONFIG_CACHE.get(id(trainer_config))
    if cached is not None and cached[0] is trainer_config:
        return cached[1]
    node = trainer_config.get("l2t") if hasattr(trainer_config, "get") else None
    if node is None:
        raise L2TConfigError(
            "l2t: the `l2t` agent loop needs the l2t config group (run l2t_verl.main, whose config "
            "l2t_trainer.yaml defines it)"
        )
    cfg = L2TConfig.from_config(node)
    _CONFIG_CACHE[id(trainer_config)] = (trainer_config, cfg)
    return cfg


class _RequestRecorder:
    """Stands in for the server manager during generation to learn the request id verl picked
    (the probes reuse it for sticky routing); everything else is delegated."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.request_ids: list[str] = []

    async def generate(self, request_id: str, **kwargs: Any) -> Any:
        self.request_ids.append(request_id)
        return await self.inner.generate(request_id, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _probe_generate_fn(server_manager: Any) -> Any:
    if isinstance(server_manager, FullyAsyncLLMServerClient):
        # Its resume loop returns a fresh TokenOutput without prompt_logprobs; a probe is one
        # short request, so the plain client call is what it needs.
        return LLMServerClient.generate.__get__(server_manager)
    return server_manager.generate


@register(L2T_AGENT_LOOP)
class L2TAgentLoop(SingleTurnAgentLoop):
    """Single-turn generation, then L2T episodes and J_r probes (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.l2t = l2t_config_of(self.config)
        # vLLM rejects max_tokens=0; the local hf server takes it and skips generation, which also
        # keeps the probe on its prefix-cached scoring path.
        self.score_max_tokens = 0 if self.rollout_config.get("name") == "hf" else 1
        self.full_determinism = bool(self.rollout_config.get("full_determinism", False))

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        recorder = _RequestRecorder(self.server_manager)
        self.server_manager = recorder
        try:
            output = await super().run(sampling_params, **kwargs)
        finally:
            self.server_manager = recorder.inner
        request_id = recorder.request_ids[-1] if recorder.request_ids else None
        fields = await self._l2t_fields(output, request_id, kwargs)
        output.extra_fields.update(fields)
        return output

    async def _l2t_fields(self, output: AgentLoopOutput, request_id: str | None, row: dict) -> dict[str, Any]:
        cfg = self.l2t
        ends: list[int] = []
        result = ProgressResult()
        if cfg.enable:
            ends = segment_episodes(output.response_ids, self.tokenizer, cfg.episodes)
            if cfg.progress_active and ends:
                result = await compute_progress(
                    output.prompt_ids,
                    output.response_ids,
                    ends,
                    (row.get("reward_model") or {}).get("ground_truth"),
                    cfg.progress,
                    self.tokenizer,
                    self._probe_generate(request_id),
                    data_source=row.get("data_source"),
                    extra_info=row.get("extra_info"),
                    score_max_tokens=self.score_max_tokens,
                    seed=zlib.crc32(str(request_id).encode()) & 0x3FFFFFFF,
                )
                if result.failed:
                    logger.warning("l2t probes failed (outcome reward only): %s", result.error)
        return {
            "l2t_episode_ends": ends,
            "l2t_jr": result.jr,
            "l2t_delta_j": result.delta_j,
            "l2t_probe_failed": result.failed,
            "l2t_probe_error": result.error,
            "l2t_probe_tokens": result.probe_tokens,
            "l2t_probe_time_s": result.probe_time_s,
            "l2t_verifier_errors": result.verifier_errors,
            "l2t_alpha": float(cfg.alpha),
        }

    def _probe_generate(self, request_id: str | None) -> Any:
        generate = _probe_generate_fn(self.server_manager)
        counter = itertools.count()
        sticky = request_id or "l2t-probe"

        async def probe(prompt_ids: list[int], sampling_params: dict[str, Any]) -> Any:
            # The generation's id routes the probe to the replica holding the response's KV cache.
            # Under full_determinism verl forwards the id to vLLM as is, and concurrent requests
            # must not share one, so each probe gets its own (deterministic) id there.
            n = next(counter)
            rid = f"{sticky}-l2t{n}" if self.full_determinism else sticky
            if faults.hit("probe", f"{sticky}:{n}"):
                raise faults.InjectedFault(f"probe {n} of request {sticky}")
            return await generate(rid, prompt_ids=prompt_ids, sampling_params=sampling_params)

        return probe
