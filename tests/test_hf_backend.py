"""The local `hf` rollout backend: engine numerics, the Ray server, and the trainer-side adapter."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from l2t_verl.local.hf_engine import HFEngine, RequestError, SamplingSpec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from l2t_verl.assets import build_all

    out = tmp_path_factory.mktemp("assets")
    return str(build_all(out, seed=0, train_size=16, val_size=4, sft_steps=0)["model"])


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def _engine(model, **kw) -> HFEngine:
    return HFEngine(model, eos_token_ids=[model.config.eos_token_id], pad_token_id=0, max_model_len=96, **kw)


def _spec(**params) -> SamplingSpec:
    return SamplingSpec.parse(params, default_max_tokens=16)


def _forward_logps(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_matches_hf_generate_under_same_seed(model, top_p):
    prompt = [5, 17, 33, 41, 8]
    eos = model.config.eos_token_id
    (completion,) = _engine(model).generate(
        [(prompt, _spec(temperature=0.9, top_p=top_p, max_tokens=20, seed=1234, ignore_eos=True))]
    )[0:1][0]
    torch.manual_seed(1234)
    ref = model.generate(
        torch.tensor([prompt]),
        do_sample=True,
        temperature=0.9,
        top_p=top_p,
        top_k=0,
        max_new_tokens=20,
        min_new_tokens=20,
        eos_token_id=eos,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    assert completion.token_ids == ref


def test_greedy_batch_with_padding_matches_single_requests(model):
    engine = _engine(model)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [5, 6, 7]]
    batched = engine.generate([(p, _spec(temperature=0, max_tokens=12, ignore_eos=True)) for p in prompts])
    for prompt, result in zip(prompts, batched, strict=True):
        single = _engine(model).generate([(prompt, _spec(temperature=0, max_tokens=12, ignore_eos=True))])[0][
            0
        ]
        assert result[0].token_ids == single.token_ids
    # the two identical prompts were prefilled once
    assert engine.stats["prefill_tokens"] == 3 + 7


def test_sampled_logprobs_equal_a_forward_pass(model):
    prompt = [3, 4, 5, 6]
    (c,) = _engine(model).generate([(prompt, _spec(temperature=1.0, max_tokens=10, logprobs=True, seed=0))])[
        0
    ]
    ref = _forward_logps(model, prompt + c.token_ids)[len(prompt) - 1 :]
    torch.testing.assert_close(torch.tensor(c.log_probs), ref, atol=1e-5, rtol=0)


def test_temperature_scales_reported_logprobs(model):
    prompt = [3, 4, 5, 6]
    (c,) = _engine(model).generate([(prompt, _spec(temperature=0.5, max_tokens=4, logprobs=True, seed=0))])[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1].float() / 0.5
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(c.log_probs), ref, atol=1e-5, rtol=0)


def test_stop_tokens_max_tokens_and_n(model):
    engine = _engine(model)
    (free,) = engine.generate([(list(range(2, 8)), _spec(temperature=0, max_tokens=12, ignore_eos=True))])[0]
    stop = free.token_ids[3]
    first_stop = free.token_ids.index(stop)
    (c,) = engine.generate(
        [(list(range(2, 8)), _spec(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop]))]
    )[0]
    assert c.token_ids == free.token_ids[: first_stop + 1] and c.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    samples = engine.generate([(list(range(2, 8)), _spec(temperature=1.0, max_tokens=6, n=3, seed=7))])[0]
    assert len(samples) == 3 and len({tuple(s.token_ids) for s in samples}) > 1


def test_prompt_scoring_equals_forward_and_reuses_prefix(model):
    engine = _engine(model)
    prompt = [5, 17, 33, 41, 8, 9]
    (c,) = engine.generate([(prompt, _spec(temperature=1.0, max_tokens=16, seed=3, ignore_eos=True))])[0]
    seq = prompt + c.token_ids
    probe_suffix = [11, 12, 13]
    for boundary in (len(prompt), len(prompt) + 5, len(seq) - 1):
        ids = seq[:boundary] + probe_suffix
        before = engine.stats["score_tokens"]
        logps, reused = engine.score(ids)
        torch.testing.assert_close(torch.tensor(logps), _forward_logps(model, ids), atol=1e-5, rtol=0)
        # only the probe suffix (plus one bridging token) is recomputed
        assert reused == boundary - 1
        assert engine.stats["score_tokens"] - before == len(probe_suffix) + 1
    logps, reused = _engine(model, prefix_cache_entries=0).score(seq)
    assert reused == 0
    torch.testing.assert_close(torch.tensor(logps), _forward_logps(model, seq), atol=1e-5, rtol=0)
    # vLLM's per-request switch: the same log-probs, computed without the cache
    ids = seq[: len(prompt) + 5] + probe_suffix
    before = engine.stats["score_tokens"]
    logps, reused = engine.score(ids, read_cache=False)
    assert reused == 0 and engine.stats["score_tokens"] - before == len(ids)
    torch.testing.assert_close(torch.tensor(logps), _forward_logps(model, ids), atol=1e-5, rtol=0)
    assert _spec(skip_reading_prefix_cache=True, detokenize=False).skip_reading_prefix_cache is True
    assert _spec(prompt_logprobs=0).skip_reading_prefix_cache is None


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], {"max_tokens": 4}, "empty prompt"),
        (list(range(1, 97)), {"max_tokens": 4}, "max_model_len"),
        ([1, 2, 10**7], {"max_tokens": 4}, "out of range"),
        ([1, 2], {"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_requests_get_clear_errors(model, prompt, params, message):
    with pytest.raises(RequestError, match=message):
        _engine(model).generate([(prompt, _spec(**params))])


def test_bad_sampling_params_get_clear_errors():
    with pytest.raises(RequestError, match="top_p"):
        _spec(top_p=0)
    with pytest.raises(RequestError, match="unsupported sampling parameter 'beam_width'"):
        _spec(beam_width=4)


def test_weight_update_changes_generation_and_rejects_unknown_names(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    engine = _engine(model)
    lm_head = dict(model.state_dict())["lm_head.weight"]
    with pytest.raises(KeyError, match="not.in_the_model"):
        engine.load_weights([("not.in_the_model", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("lm_head.weight", torch.zeros(3, 3))])
    # tied embeddings: the actor sends lm_head.weight, which must land on the shared matrix
    engine.load_weights([("lm_head.weight", torch.zeros_like(lm_head))])
    assert float(model.get_input_embeddings().weight.detach().abs().sum()) == 0.0


# ---------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def _rollout_config(**overrides):
    from omegaconf import OmegaConf

    cfg = {
        "_target_": "verl.workers.config.RolloutConfig",
        "name": "hf",
        "prompt_length": 64,
        "response_length": 24,
        "tensor_model_parallel_size": 1,
        "free_cache_engine": False,
        "checkpoint_engine": {
            "_target_": "verl.workers.config.CheckpointEngineConfig",
            "update_weights_bucket_megabytes": 1,
        },
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


@pytest.mark.slow
def test_server_over_ray_generates_scores_and_takes_weight_updates(ray_session, model_dir):
    from omegaconf import OmegaConf

    from l2t_verl.local.hf_server import HFRolloutServer, server_actor_name
    from l2t_verl.local.rollout import HFServerAdapter

    ray = ray_session
    model_config = OmegaConf.create({"_target_": "verl.workers.config.HFModelConfig", "path": model_dir})
    server = (
        ray.remote(HFRolloutServer)
        .options(name=server_actor_name(0), max_concurrency=64)
        .remote(config=_rollout_config(), model_config=model_config)
    )
    ray.get(server.launch_server.remote())

    prompt = [5, 17, 33, 41, 8]
    params = {"temperature": 1.0, "max_tokens": 8, "logprobs": True, "ignore_eos": True}
    outs = ray.get([server.generate.remote(prompt, dict(params, seed=i), f"r{i}") for i in range(6)])
    assert all(len(o.token_ids) == 8 and len(o.log_probs) == 8 for o in outs)
    assert ray.get(server.engine_stats.remote())["prefill_tokens"] < 6 * len(prompt)  # batched + shared

    scored = ray.get(server.generate.remote(prompt, {"prompt_logprobs": 0, "max_tokens": 0}, "s"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    got = torch.tensor([lp[0] for lp in scored.extra_fields["prompt_logprobs"][:-1]])
    torch.testing.assert_close(got, _forward_logps(model, prompt), atol=1e-5, rtol=0)

    with pytest.raises(ray.exceptions.RayTaskError, match="empty prompt"):
        ray.get(server.generate.remote([], params, "bad"))
    # a bad request does not take the server down
    assert len(ray.get(server.generate.remote(prompt, params, "after")).token_ids) == 8

    # the trainer-side adapter pushes (bucketed) weights to the named server actor
    os.environ.setdefault("RANK", "0")
    adapter = HFServerAdapter(_rollout_config(), model_config, device_mesh=None)
    new = {k: v + 0.5 for k, v in model.state_dict().items()}
    asyncio.run(adapter.update_weights(iter(new.items()), global_steps=3))
    served = ray.get(server.get_weights.remote())
    for name, tensor in new.items():
        torch.testing.assert_close(served[name], tensor)
    after = ray.get(server.generate.remote(prompt, {"prompt_logprobs": 0, "max_tokens": 0}, "s2"))
    assert after.extra_fields["global_steps"] == 3
    assert after.extra_fields["prompt_logprobs"] != scored.extra_fields["prompt_logprobs"]
    ray.kill(server)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2), max_size=40), st.lists(st.integers(0, 2), max_size=40), st.integers(0, 40))
def test_common_prefix_len_matches_a_linear_scan(a, b, n):
    from l2t_verl.local.hf_engine import _common_prefix_len

    n = min(n, len(a), len(b))
    expected = 0
    while expected < n and a[expected] == b[expected]:
        expected += 1
    assert _common_prefix_len(tuple(a), tuple(b), n) == expected
