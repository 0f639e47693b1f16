"""The ``l2t`` agent loop end to end, in-process: verl's own AgentLoopWorker and RewardLoopWorker code,
the real ``hf`` rollout server for the probes, and a forced response with several episodes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl import DataProto
from verl.workers.rollout.replica import TokenOutput

import l2t_verl
from l2t_verl.agent_loop import L2TAgentLoop
from l2t_verl.episodes import segment_episodes
from l2t_verl.probes import force_token_ids
from l2t_verl.record import SampleRecord
from l2t_verl.settings import ProgressConfig

FORCED_RESPONSE = (
    "<think>\n8 - 3 = 5\n\n5 - 4 = 1\n\n1 * 2 = 2\n</think>\nThe answer is \\boxed{2}.<|im_end|>"
)
PROMPT_LENGTH, RESPONSE_LENGTH = 256, 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    from l2t_verl.assets import build_all

    return build_all(
        tmp_path_factory.getbasetemp() / "l2t_assets", seed=0, train_size=16, val_size=4, sft_steps=0
    )


@pytest.fixture(scope="module")
def config(assets):
    config_dir = os.path.join(os.path.dirname(l2t_verl.__file__), "config")
    scoring = Path(l2t_verl.__file__).parent / "scoring" / "__init__.py"
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(
            "l2t_trainer",
            overrides=[
                "preset=cpu",
                f"actor_rollout_ref.model.path={assets['model']}",
                "algo=l2t",  # agent loop, reward manager, advantage and trainer `l2t`
                f"reward.custom_reward_function.path={scoring}",
                f"data.max_prompt_length={PROMPT_LENGTH}",
                f"data.max_response_length={RESPONSE_LENGTH}",
                "l2t.episodes.max_episodes=8",
            ],
        )


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets["model"])


@pytest.fixture(scope="module")
def model(assets):
    return AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def rows(assets) -> list[dict]:
    import pandas as pd

    df = pd.read_parquet(assets["train"])
    out = []
    for i in range(2):
        row = df.iloc[i].to_dict()
        out.append(
            {
                "raw_prompt": [dict(m) for m in row["prompt"]],
                "data_source": row["data_source"],
                "reward_model": dict(row["reward_model"]),
                "extra_info": dict(row["extra_info"]),
                "index": i,
                "uid": f"uid-{i}",
            }
        )
    return out


class ForcedResponseClient:
    """Stands in for verl's LLMServerClient: the generation request gets FORCED_RESPONSE (so the test
    controls the episodes); every probe goes to the real hf server. The server first scores the
    forced sequence, as if it had sampled it, so its prefix cache holds the response as in training."""

    def __init__(self, server, tokenizer):
        self.server = server
        self.response_ids = tokenizer.encode(FORCED_RESPONSE, add_special_tokens=False)
        self.requests: list[tuple[str, list[int], dict]] = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        self.requests.append((request_id, list(prompt_ids), dict(sampling_params)))
        if "prompt_logprobs" not in sampling_params:
            await self.server.generate(
                list(prompt_ids) + self.response_ids, {"prompt_logprobs": 0, "max_tokens": 0}, request_id
            )
            return TokenOutput(
                token_ids=self.response_ids,
                log_probs=[-1.0] * len(self.response_ids),
                stop_reason="completed",
                extra_fields={"global_steps": 0},
            )
        return await self.server.generate(prompt_ids, sampling_params, request_id)


async def launch_server(model_dir) -> object:
    """The real ``hf`` rollout server, in-process (no Ray): the request path used in training."""
    from omegaconf import OmegaConf

    from l2t_verl.local.hf_server import HFRolloutServer

    rollout = OmegaConf.create(
        {
            "_target_": "verl.workers.config.RolloutConfig",
            "name": "hf",
            "prompt_length": PROMPT_LENGTH,
            "response_length": RESPONSE_LENGTH,
            "tensor_model_parallel_size": 1,
            "free_cache_engine": False,
        }
    )
    model_cfg = OmegaConf.create({"_target_": "verl.workers.config.HFModelConfig", "path": str(model_dir)})
    server = HFRolloutServer(config=rollout, model_config=model_cfg)
    await server.launch_server()
    return server


def brute_force_jr(model, ids_before_force: list[list[int]], force, answer) -> list[float]:
    out = []
    for prefix in ids_before_force:
        ids = prefix + force + answer
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        out.append(float(torch.exp(logps[-len(answer) :].sum())))
    return out


def make_agent_loop(config, client, tokenizer):
    """Exactly how verl's AgentLoopWorker._run_agent_loop builds an agent loop."""
    import hydra
    from verl.experimental.agent_loop.agent_loop import (
        DictConfigWrap,
        ToolListWrap,
        _agent_loop_registry,
    )
    from verl.utils.dataset.rl_dataset import RLHFDataset

    return hydra.utils.instantiate(
        config=_agent_loop_registry[config.actor_rollout_ref.rollout.agent.default_agent_loop],
        trainer_config=DictConfigWrap(config=config),
        server_manager=client,
        tokenizer=tokenizer,
        processor=None,
        hf_model_type="qwen2",
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        tools=ToolListWrap([]),
    )


async def test_run_segments_probes_and_matches_brute_force(assets, config, tokenizer, model, rows):
    server = await launch_server(assets["model"])
    client = ForcedResponseClient(server, tokenizer)
    loop = make_agent_loop(config, client, tokenizer)
    assert isinstance(loop, L2TAgentLoop)

    row = rows[0]
    output = await loop.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}, **row)
    extra = output.extra_fields
    assert set(SampleRecord().to_extra_fields()) <= set(extra)
    record = SampleRecord.from_extra_fields(extra)
    record.check(len(output.response_ids), progress=True)
    assert output.response_ids == client.response_ids

    ends = extra["l2t_episode_ends"]
    assert ends == segment_episodes(output.response_ids, tokenizer, loop.l2t.episodes)
    assert len(ends) == 3  # three "\n\n"-separated steps before </think>
    text_before = [tokenizer.decode(output.response_ids[:e]) for e in ends]
    assert text_before[0].endswith("8 - 3 = 5\n\n") and text_before[-1].endswith("1 * 2 = 2\n")

    assert not extra["l2t_probe_failed"] and extra["l2t_probe_error"] is None
    force = force_token_ids(tokenizer, ProgressConfig(**config.l2t.progress))
    answer = tokenizer.encode(row["reward_model"]["ground_truth"] + "}", add_special_tokens=False)
    prefixes = [output.prompt_ids + output.response_ids[:b] for b in [0, *ends]]
    expected = brute_force_jr(model, prefixes, force, answer)
    torch.testing.assert_close(torch.tensor(extra["l2t_jr"]), torch.tensor(expected), rtol=1e-4, atol=0)
    assert extra["l2t_delta_j"] == [b - a for a, b in zip(extra["l2t_jr"], extra["l2t_jr"][1:], strict=False)]

    # probes: same request id as the generation (sticky routing), prefill-only on the hf server
    gen_id = client.requests[0][0]
    probes = client.requests[1:]
    assert len(probes) == len(ends) + 1
    assert all(rid == gen_id for rid, _, _ in probes)
    # detokenize off (only log-probs are read); the cache switch left unset, vLLM's default (no prefix_cache)
    plain = {"prompt_logprobs": 0, "max_tokens": 0, "temperature": 0.0, "detokenize": False}
    assert all(p == plain for _, _, p in probes)
    assert extra["l2t_probe_cache_fallbacks"] == 0
    assert sorted(ids for _, ids, _ in probes) == sorted(p + force + answer for p in prefixes)
    per_probe = len(force) + len(answer) + 1
    assert extra["l2t_probe_tokens"] <= (len(ends) + 1) * per_probe

    # v1 TransferQueue path: verl sets reward_score (= r_out) and reward_extra_info, then stores
    # as_dict() + the row per sample; the l2t fields come back as one dict per sample.
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    output.reward_score = 1.0
    output.extra_fields["reward_extra_info"] = {"acc": 1.0, "l2t_outcome": 1.0, "l2t_verifier_error": 0}
    field = output.as_dict()
    field.update(row)
    expected_rm = torch.zeros(len(output.response_ids))
    expected_rm[-1] = 1.0
    torch.testing.assert_close(field["rm_scores"], expected_rm)
    td = list_of_dict_to_tensordict([field, dict(field)])
    stored = list(td["extra_fields"])[0]
    assert stored["l2t_episode_ends"] == ends and stored["l2t_delta_j"] == extra["l2t_delta_j"]
    assert stored["reward_extra_info"]["l2t_outcome"] == 1.0


async def test_prefix_cache_setting_reaches_the_probes_and_keeps_j_r(assets, config, tokenizer, model, rows):
    """``l2t.progress.prefix_cache=true``: every probe the agent loop sends asks to read the cache, the
    reply is parsed right-aligned, and J_r is the brute-force value with no fallback (each probe's
    answer lies past the cached response prefix)."""
    from omegaconf import OmegaConf

    cached_config = OmegaConf.merge(config, {"l2t": {"progress": {"prefix_cache": True}}})
    server = await launch_server(assets["model"])
    client = ForcedResponseClient(server, tokenizer)
    loop = make_agent_loop(cached_config, client, tokenizer)
    assert loop.l2t.progress.prefix_cache

    row = rows[0]
    output = await loop.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}, **row)
    extra = output.extra_fields
    assert not extra["l2t_probe_failed"], extra["l2t_probe_error"]
    probes = client.requests[1:]
    ends = extra["l2t_episode_ends"]
    assert len(probes) == len(ends) + 1
    expected = {
        "prompt_logprobs": 0,
        "max_tokens": 0,
        "temperature": 0.0,
        "detokenize": False,
        "skip_reading_prefix_cache": False,
    }
    assert all(p == expected for _, _, p in probes)
    assert extra["l2t_probe_cache_fallbacks"] == 0

    force = force_token_ids(tokenizer, ProgressConfig(**cached_config.l2t.progress))
    answer = tokenizer.encode(row["reward_model"]["ground_truth"] + "}", add_special_tokens=False)
    prefixes = [output.prompt_ids + output.response_ids[:b] for b in [0, *ends]]
    jr = brute_force_jr(model, prefixes, force, answer)
    torch.testing.assert_close(torch.tensor(extra["l2t_jr"]), torch.tensor(jr), rtol=1e-4, atol=0)


async def test_verl_worker_picks_l2t_by_default_and_carries_fields_to_reward_and_batch(
    assets, config, tokenizer, rows
):
    """verl's AgentLoopWorker.generate_sequences with streaming rewards from a real RewardLoopWorker:
    agent_name comes from default_agent_loop, the reward manager sees the l2t fields, and the
    legacy DataProto batch carries them as columns."""
    from types import SimpleNamespace

    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    server = await launch_server(assets["model"])
    client = ForcedResponseClient(server, tokenizer)
    reward_worker = RewardLoopWorker(config)
    seen_by_reward = []

    async def compute_score(data):
        seen_by_reward.append(dict(data.non_tensor_batch["tool_extra_fields"][0]))
        return await reward_worker.compute_score(data)

    handle = SimpleNamespace(compute_score=SimpleNamespace(remote=compute_score))
    worker = AgentLoopWorker(config, llm_client=client, reward_loop_worker_handles=[handle])

    non_tensor = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        column[:] = [r[key] for r in rows]
        non_tensor[key] = column
    batch = DataProto(non_tensor_batch=non_tensor, meta_info={"global_steps": 1, "validate": False})
    out = await worker.generate_sequences(batch)

    # the reward manager got the l2t fields through tool_extra_fields
    assert len(seen_by_reward) == 2 and all(len(s["l2t_episode_ends"]) == 3 for s in seen_by_reward)
    # outcome: the forced response boxes "2"; each row has its own ground truth
    outcomes = [float(r["reward_model"]["ground_truth"] == "2") for r in rows]
    assert out.non_tensor_batch["l2t_outcome"].tolist() == outcomes
    assert out.non_tensor_batch["l2t_verifier_error"].tolist() == [0, 0]
    for i in range(2):
        assert list(out.non_tensor_batch["l2t_episode_ends"][i]) == seen_by_reward[i]["l2t_episode_ends"]
        assert len(out.non_tensor_batch["l2t_jr"][i]) == 4
        assert not out.non_tensor_batch["l2t_probe_failed"][i]
    # this legacy path keeps verl's scalar-on-last-token rm_scores (see the agent_loop docstring)
    length = len(client.response_ids)
    assert out.batch["rm_scores"][:, length - 1].tolist() == outcomes
    assert float(out.batch["rm_scores"][:, : length - 1].abs().sum()) == 0.0


def test_probes_bypass_the_fully_async_resume_loop():
    """FullyAsyncLLMServerClient rebuilds replies without prompt_logprobs; probes use the base call."""
    from verl.workers.rollout.llm_server import FullyAsyncLLMServerClient, LLMServerClient

    from l2t_verl.agent_loop import _probe_generate_fn

    fully_async = FullyAsyncLLMServerClient(config=None, load_balancer_handle=None)
    assert _probe_generate_fn(fully_async).__func__ is LLMServerClient.generate
    plain = LLMServerClient(config=None, load_balancer_handle=None)
    assert _probe_generate_fn(plain) == plain.generate
