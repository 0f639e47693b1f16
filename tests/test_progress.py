"""J_r probes (docs/method.md §2): likelihood against a brute-force forward pass through the real hf server,
sampling against stubs, concurrency, failures, K = 0, prefix-cache reuse, the opt-in prefix-cached
scoring for vLLM (right-aligned replies, fallbacks) and the probe timeout that grows with K."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from l2t_verl.probes import force_token_ids, forced_probe_prompts, ground_truth_text, probe_prompts
from l2t_verl.progress import (
    ProbeError,
    ProgressResult,
    compute_progress,
    likelihood_from_answer_logprobs,
    likelihood_from_prompt_logprobs,
    likelihood_params,
)
from l2t_verl.scoring import extract_boxed
from l2t_verl.settings import ProgressConfig

LIKELIHOOD = ProgressConfig(estimator="likelihood")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from l2t_verl.assets import build_all

    # One shared directory: build_all skips the rebuild when its manifest matches, so the other
    # test modules that ask for the same assets reuse them.
    return str(
        build_all(
            tmp_path_factory.getbasetemp() / "l2t_assets", seed=0, train_size=16, val_size=4, sft_steps=0
        )["model"]
    )


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


async def launch_hf_server(model_dir: str, prompt_length: int = 256, response_length: int = 64):
    """The real ``hf`` rollout server, in-process (no Ray): same request path as in training."""
    from l2t_verl.local.hf_server import HFRolloutServer

    rollout = OmegaConf.create(
        {
            "_target_": "verl.workers.config.RolloutConfig",
            "name": "hf",
            "prompt_length": prompt_length,
            "response_length": response_length,
            "tensor_model_parallel_size": 1,
            "free_cache_engine": False,
        }
    )
    model_cfg = OmegaConf.create({"_target_": "verl.workers.config.HFModelConfig", "path": model_dir})
    server = HFRolloutServer(config=rollout, model_config=model_cfg)
    await server.launch_server()
    return server


def chat_prompt(tokenizer, text: str = "Start at 8. Add 3. What is the result?") -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def brute_force_jr(model, prompt, response, ends, force, answer) -> list[float]:
    """exp(sum log p(answer | prompt + response[:b] + force)) by one plain forward per boundary."""
    out = []
    for b in [0, *ends]:
        ids = list(prompt) + list(response[:b]) + list(force) + list(answer)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        out.append(math.exp(float(logps[-len(answer) :].sum())))
    return out


def token_output(token_ids=(), **extra) -> SimpleNamespace:
    return SimpleNamespace(token_ids=list(token_ids), stop_reason="completed", extra_fields=dict(extra))


def fake_prompt_logprobs(n: int, value: float = -0.1) -> list[list[float]]:
    return [[value]] * (n - 1) + [[0.0]]


# ------------------------------------------------------------------------------------------ likelihood


@pytest.mark.parametrize("score_max_tokens", [0, 1])
async def test_likelihood_equals_brute_force_and_reuses_the_prefix_cache(
    model_dir, model, tokenizer, score_max_tokens
):
    server = await launch_hf_server(model_dir)
    prompt = chat_prompt(tokenizer)
    generated = await server.generate(
        prompt, {"temperature": 1.0, "max_tokens": 24, "seed": 7, "ignore_eos": True}, "gen"
    )
    response = generated.token_ids
    ends = [5, 12, 24]
    stats_before = dict(server.engine.stats)

    async def generate(ids, params):
        return await server.generate(ids, params, "probe")

    result = await compute_progress(
        prompt, response, ends, "11", LIKELIHOOD, tokenizer, generate, score_max_tokens=score_max_tokens
    )
    assert not result.failed, result.error
    force = force_token_ids(tokenizer, LIKELIHOOD)
    answer = tokenizer.encode("11}", add_special_tokens=False)
    expected = brute_force_jr(model, prompt, response, ends, force, answer)
    torch.testing.assert_close(torch.tensor(result.jr), torch.tensor(expected), rtol=1e-4, atol=0)
    assert all(0.0 <= j <= 1.0 for j in result.jr)
    assert result.delta_j == [b - a for a, b in zip(result.jr, result.jr[1:], strict=False)]
    assert len(result.delta_j) == len(ends)

    # Prefix reuse: each probe recomputes ~ its force + answer (+1 bridging token), not the response.
    # The probe after the LAST token costs one more: the server never fed its final sampled token.
    scored = server.engine.stats["score_tokens"] - stats_before["score_tokens"]
    cached = server.engine.stats["score_cached_tokens"] - stats_before["score_cached_tokens"]
    per_probe = len(force) + len(answer) + 1
    assert (len(force) + len(answer)) * 4 <= scored <= per_probe * 4 + 1
    assert cached >= sum(len(prompt) + min(b, len(response) - 1) - 1 for b in [0, *ends])
    generated_tokens = 4 * score_max_tokens
    assert result.probe_tokens == scored + generated_tokens


def test_likelihood_from_prompt_logprobs_uses_the_answer_positions():
    # ids: 5 probe tokens + 2 answer tokens; entry i is log p(token i+1); last entry is a dummy.
    lps = [[-9.0], [-9.0], [-9.0], [-9.0], [-0.5], [-0.25], [0.0]]
    assert likelihood_from_prompt_logprobs(lps, total_len=7, answer_len=2) == pytest.approx(math.exp(-0.75))
    with pytest.raises(ProbeError, match="one entry per prompt token"):
        likelihood_from_prompt_logprobs(lps[:-1], total_len=7, answer_len=2)


def test_probe_prompts_append_force_ids_to_sampled_ids():
    prompts = probe_prompts([1, 2], [10, 11, 12, 13], [1, 3], [99, 98])
    assert prompts == [[1, 2, 99, 98], [1, 2, 10, 99, 98], [1, 2, 10, 11, 12, 99, 98]]
    with pytest.raises(ValueError):
        probe_prompts([1], [10, 11], [1, 5], [99])


def test_ground_truth_text():
    import numpy as np

    assert ground_truth_text("42") == "42"
    assert ground_truth_text(7) == "7"
    assert ground_truth_text(np.array(["3", "three"], dtype=object)) == "3"
    assert ground_truth_text(["\\frac{1}{2}", "0.5"]) == "\\frac{1}{2}"
    assert (
        ground_truth_text(None) is None and ground_truth_text("  ") is None and ground_truth_text([]) is None
    )


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        (" 42\n", "42"),
        ("$42$", "42"),
        ("$$ 42 $$", "42"),
        ("\\(x+1\\)", "x+1"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("$\\boxed{ 5 }$", "5"),
        ("\\boxed{1} + \\boxed{2}", "\\boxed{1} + \\boxed{2}"),  # not one boxed answer
        ("$a$ and $b$", "$a$ and $b$"),  # not one wrapped answer
        ("$", "$"),
    ],
)
def test_ground_truth_is_normalised_to_what_the_policy_writes_in_the_box(raw, target):
    assert ground_truth_text(raw) == target
    assert ground_truth_text([raw, "other"]) == target


def test_think_tags_probes_close_the_reasoning_exactly_once(tokenizer):
    """In think_tags mode every episode ends with </think>: the probes after an episode must not close
    it again, while the k = 0 probe (inside the open reasoning) must."""
    from l2t_verl.episodes import EpisodeConfig, segment_episodes

    cfg = ProgressConfig(force_suffix="\n</think>\nThe answer is \\boxed{")
    text = (
        "<think>\n8 + 3 = 11\n</think><think>\n11 * 2 = 22\n</think>\n<think>\ncheck\n</think>\nThe answer is"
    )
    response = tokenizer.encode(text, add_special_tokens=False)
    ends = segment_episodes(response, tokenizer, EpisodeConfig(mode="think_tags"))
    assert len(ends) == 3
    prompt = chat_prompt(tokenizer)
    probes = forced_probe_prompts(prompt, response, ends, tokenizer, cfg)
    assert len(probes) == len(ends) + 1
    for k, probe in enumerate(probes):
        decoded = tokenizer.decode(probe[len(prompt) :], skip_special_tokens=False)
        # each <think> block is closed once, and the forced answer follows the last close
        assert decoded.count("</think>") == max(k, 1), decoded
        assert "</think>\n</think>" not in decoded and "</think></think>" not in decoded
        assert decoded.endswith("</think>\nThe answer is \\boxed{"), decoded
    # delimiter mode never ends a prefix on </think>: every probe gets the full suffix
    delim = probe_prompts(
        prompt,
        response[:5],
        [2, 5],
        force_token_ids(tokenizer, cfg),
        force_token_ids(tokenizer, cfg, closed=True),
        tokenizer,
    )
    assert all(p[-len(force_token_ids(tokenizer, cfg)) :] == force_token_ids(tokenizer, cfg) for p in delim)


def test_answer_suffix_that_merges_with_the_next_character_is_refused(tokenizer):
    from l2t_verl.probes import check_answer_suffix
    from l2t_verl.settings import L2TConfigError

    # The asset tokenizer merges "}." into one token (the warm-started model always writes it).
    assert tokenizer.encode("}.", add_special_tokens=False) != tokenizer.encode(
        "}", add_special_tokens=False
    ) + tokenizer.encode(".", add_special_tokens=False)
    with pytest.raises(L2TConfigError) as err:
        check_answer_suffix(tokenizer, "}")
    message = str(err.value)
    assert message.startswith("l2t.progress.answer_suffix") and "'}.'" in message and "\n" not in message
    check_answer_suffix(tokenizer, "}.")  # the task=arith setting passes
    check_answer_suffix(tokenizer, "")


# ------------------------------------------------------------------------------------------ sampling


def sampling_stub(tokenizer, prompt_len, ends, correct_per_probe, m, base_seed, wrong="7}"):
    """Probe k's j-th sample (seed base + k*m + j) answers "42}" when j < correct_per_probe[k]."""
    calls = []
    force_len = len(force_token_ids(tokenizer, ProgressConfig()))
    boundary_of_len = {prompt_len + b + force_len: k for k, b in enumerate([0, *ends])}
    right_ids = tokenizer.encode("42}", add_special_tokens=False)
    wrong_ids = tokenizer.encode(wrong, add_special_tokens=False)

    async def generate(ids, params):
        calls.append((list(ids), dict(params)))
        offset = params["seed"] - base_seed
        k, j = divmod(offset, m)
        assert boundary_of_len[len(ids)] == k  # seeds are laid out probe by probe
        return token_output(
            right_ids if j < correct_per_probe[k] else wrong_ids, num_cached_tokens=len(ids) - 3
        )

    return generate, calls


async def test_sampling_estimator_counts_correct_forced_answers(tokenizer):
    cfg = ProgressConfig(estimator="sampling", num_samples=4, max_answer_tokens=5, temperature=0.7)
    prompt, response, ends = [1, 2, 3], list(range(10, 30)), [4, 9, 20]
    generate, calls = sampling_stub(tokenizer, len(prompt), ends, [0, 1, 3, 4], m=4, base_seed=1000)
    result = await compute_progress(
        prompt, response, ends, "42", cfg, tokenizer, generate, data_source="l2t_arith", seed=1000
    )
    # default verifier: l2t_verl.scoring.compute_score on force_suffix + continuation
    assert not result.failed, result.error
    assert result.jr == [0.0, 0.25, 0.75, 1.0]
    assert result.delta_j == [0.25, 0.5, 0.25]
    assert result.verifier_errors == 0
    assert len(calls) == 4 * 4
    assert len({c[1]["seed"] for c in calls}) == 16
    assert all(c[1]["temperature"] == 0.7 and c[1]["max_tokens"] == 5 for c in calls)
    assert all(c[1]["detokenize"] is False for c in calls)  # continuations are decoded from their ids
    continuation = len(tokenizer.encode("42}", add_special_tokens=False))
    assert result.probe_tokens >= 16 * 3  # 3 uncached prompt tokens per request, plus its continuation
    assert result.probe_tokens <= 16 * (3 + max(continuation, 2))


async def test_sampling_verifier_errors_count_as_incorrect(tokenizer):
    cfg = ProgressConfig(estimator="sampling", num_samples=2)
    prompt, response, ends = [1, 2], list(range(10, 20)), [5]
    generate, _ = sampling_stub(tokenizer, len(prompt), ends, [2, 1], m=2, base_seed=0, wrong="13}")
    seen_texts = []

    def verifier(data_source, text, ground_truth, extra_info):
        seen_texts.append(text)
        if extract_boxed(text) == "13":
            raise RuntimeError("verifier crashed")
        return {"score": 1.0 if extract_boxed(text) == ground_truth else 0.0}

    result = await compute_progress(
        prompt, response, ends, "42", cfg, tokenizer, generate, verifier=verifier, seed=0
    )
    assert not result.failed
    assert result.jr == [1.0, 0.5] and result.delta_j == [-0.5]
    assert result.verifier_errors == 1
    assert all(t.startswith(cfg.force_suffix) for t in seen_texts)


async def test_sampling_verifier_timeout_counts_as_error(tokenizer):
    import time

    cfg = ProgressConfig(estimator="sampling", num_samples=1)
    generate, _ = sampling_stub(tokenizer, 2, [3], [1, 1], m=1, base_seed=0)

    def slow_verifier(*args):
        time.sleep(0.5)
        return 1.0

    result = await compute_progress(
        [1, 2],
        [5, 6, 7],
        [3],
        "42",
        cfg,
        tokenizer,
        generate,
        verifier=slow_verifier,
        verifier_timeout_s=0.05,
        seed=0,
    )
    assert not result.failed and result.jr == [0.0, 0.0] and result.verifier_errors == 2


# ------------------------------------------------------------------------------------------ concurrency


@pytest.mark.parametrize("estimator", ["likelihood", "sampling"])
async def test_all_probes_are_in_flight_before_any_completes(tokenizer, estimator):
    cfg = ProgressConfig(estimator=estimator, num_samples=3, timeout_s=5.0)
    ends = [2, 4, 6, 8]
    expected_requests = (len(ends) + 1) * (cfg.num_samples if estimator == "sampling" else 1)
    all_in = asyncio.Event()
    in_flight = 0
    peak = 0

    async def generate(ids, params):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == expected_requests:
            all_in.set()
        # Sequential probes would block here forever (the test's timeout turns that into a failure).
        await asyncio.wait_for(all_in.wait(), timeout=2.0)
        in_flight -= 1
        if estimator == "likelihood":
            return token_output(prompt_logprobs=fake_prompt_logprobs(len(ids)))
        return token_output(tokenizer.encode("42}", add_special_tokens=False))

    result = await compute_progress(
        [1, 2, 3], list(range(10, 20)), ends, "42", cfg, tokenizer, generate, data_source="l2t_arith"
    )
    assert not result.failed, result.error
    assert peak == expected_requests
    assert len(result.jr) == len(ends) + 1


# ------------------------------------------------------------------------------------------ failures


def likelihood_stub(fail_at_len=None, hang_at_len=None, aborted=False):
    calls = []

    async def generate(ids, params):
        calls.append(len(ids))
        if len(ids) == fail_at_len:
            raise ConnectionError("server went away")
        if len(ids) == hang_at_len:
            await asyncio.sleep(60)
        out = token_output(prompt_logprobs=fake_prompt_logprobs(len(ids)))
        if aborted:
            out.stop_reason = "aborted"
            out.extra_fields = {}
        return out

    return generate, calls


async def test_a_failed_probe_fails_the_response_without_raising(tokenizer):
    force_len = len(force_token_ids(tokenizer, LIKELIHOOD))
    answer_len = len(tokenizer.encode("42}", add_special_tokens=False))
    ends = [2, 4, 6]
    fail_len = 3 + 4 + force_len + answer_len  # the probe after episode 2
    generate, calls = likelihood_stub(fail_at_len=fail_len)
    result = await compute_progress(
        [1, 2, 3], list(range(10, 16)), ends, "42", LIKELIHOOD, tokenizer, generate
    )
    assert isinstance(result, ProgressResult)
    assert result.failed and result.jr == [] and result.delta_j == []
    assert "ConnectionError" in result.error and "server went away" in result.error


async def test_a_probe_past_the_timeout_fails_the_response(tokenizer):
    force_len = len(force_token_ids(tokenizer, LIKELIHOOD))
    answer_len = len(tokenizer.encode("42}", add_special_tokens=False))
    generate, _ = likelihood_stub(hang_at_len=3 + force_len + answer_len)
    cfg = replace(LIKELIHOOD, timeout_s=0.2, timeout_per_probe_s=0.0)
    result = await compute_progress([1, 2, 3], [10, 11, 12], [1, 3], "42", cfg, tokenizer, generate)
    assert result.failed and result.jr == [] and "TimeoutError" in result.error
    assert result.probe_time_s < 5


@pytest.mark.parametrize(
    "case, error",
    [("aborted", "aborted"), ("no_logprobs", "prompt_logprobs"), ("no_ground_truth", "ground truth")],
)
async def test_unusable_replies_and_rows_fail_the_response(tokenizer, case, error):
    async def no_logprobs(ids, params):
        return token_output()

    generate = {
        "aborted": likelihood_stub(aborted=True)[0],
        "no_logprobs": no_logprobs,
        "no_ground_truth": likelihood_stub()[0],
    }[case]
    gt = None if case == "no_ground_truth" else "42"
    result = await compute_progress([1, 2, 3], [10, 11, 12], [3], gt, LIKELIHOOD, tokenizer, generate)
    assert result.failed and result.jr == [] and error in result.error


async def test_no_episode_means_no_probe(tokenizer):
    async def generate(ids, params):
        raise AssertionError("K = 0 must not send any probe")

    result = await compute_progress([1, 2, 3], [], [], "42", LIKELIHOOD, tokenizer, generate)
    assert result == ProgressResult()
    assert not result.failed and result.jr == [] and result.delta_j == [] and result.probe_tokens == 0


async def test_async_verifier_is_awaited(tokenizer):
    cfg = ProgressConfig(estimator="sampling", num_samples=2)
    generate, _ = sampling_stub(tokenizer, 2, [3], [1, 2], m=2, base_seed=0)

    async def verifier(data_source, text, ground_truth, extra_info):
        await asyncio.sleep(0)
        return 1.0 if extract_boxed(text) == ground_truth else 0.0

    result = await compute_progress(
        [1, 2], [5, 6, 7], [3], "42", cfg, tokenizer, generate, verifier=verifier, seed=0
    )
    assert result.jr == [0.5, 1.0] and result.verifier_errors == 0


# ------------------------------------------------------------------------------------------ prefix cache

# 5 probe tokens + 2 answer tokens: entry i is log p(token i+1), the last entry a dummy. The answer is
# tokens 5 and 6, so J_r = exp(-0.75); -9 marks the entries that must not be read.
FULL_REPLY = [[-9.0], [-9.0], [-9.0], [-9.0], [-0.5], [-0.25], [0.0]]
ANSWER_ONLY = FULL_REPLY[-3:]  # 4 tokens cached: logits at positions 4..6 -> tokens 5, 6 and the dummy


def test_answer_logprobs_of_a_full_reply_equal_full_scoring():
    full = likelihood_from_prompt_logprobs(FULL_REPLY, total_len=7, answer_len=2)
    assert full == pytest.approx(math.exp(-0.75))
    assert likelihood_from_answer_logprobs(FULL_REPLY, 7, 2, num_cached_tokens=0) == pytest.approx(full)


def test_answer_logprobs_of_a_prefix_cached_reply_are_read_right_aligned():
    assert likelihood_from_answer_logprobs(ANSWER_ONLY, 7, 2, num_cached_tokens=4) == pytest.approx(
        math.exp(-0.75)
    )
    assert likelihood_from_answer_logprobs([[-9.0], *ANSWER_ONLY], 7, 2, 3) == pytest.approx(math.exp(-0.75))
    # Full length with the cached positions empty, or left as whatever the buffer held: a positive
    # "log-prob" there would raise if it were read.
    assert likelihood_from_answer_logprobs([None] * 4 + ANSWER_ONLY, 7, 2, 4) == pytest.approx(
        math.exp(-0.75)
    )
    assert likelihood_from_answer_logprobs([[123.0]] * 4 + ANSWER_ONLY, 7, 2, 4) == pytest.approx(
        math.exp(-0.75)
    )


@pytest.mark.parametrize(
    ("reply", "cached"),
    [
        (FULL_REPLY[-2:], 5),  # the first answer token was cached: its log-prob was never computed
        (FULL_REPLY, 5),  # same, full length: entry 4 holds no computed value
        ([[None], [-0.25], [0.0]], 4),  # an answer entry is None
        ([None, [-0.25], [0.0]], 4),
        ([[], [-0.25], [0.0]], 4),
        (FULL_REPLY, None),  # the cache hit is not reported: the entries cannot be placed
        (ANSWER_ONLY, 0),  # a length that fits neither a full nor a cached reply
        (ANSWER_ONLY, 3),
        (None, 0),
    ],
)
def test_answer_logprobs_missing_for_the_answer_mean_fallback(reply, cached):
    assert likelihood_from_answer_logprobs(reply, 7, 2, num_cached_tokens=cached) is None


def test_answer_logprobs_reject_malformed_replies():
    with pytest.raises(ProbeError, match="8 entries"):
        likelihood_from_answer_logprobs([[-0.1]] * 8, 7, 2, 0)
    with pytest.raises(ProbeError, match="invalid log-prob"):
        likelihood_from_answer_logprobs([[-0.1]] * 5 + [[float("nan")], [0.0]], 7, 2, 0)


def position_logprob(p: int) -> float:
    """The stub's log p(token p): different at every position, so a misplaced entry changes J_r."""
    return -0.01 * p


def vllm_like_stub(cache_hit):
    """Replies like verl's vLLM server with prefix caching: a request that reads the cache gets
    ``cache_hit(ids)`` tokens from it and prompt log-probs for the computed positions only."""
    calls = []

    async def generate(ids, params):
        calls.append((list(ids), dict(params)))
        cached = cache_hit(ids) if params.get("skip_reading_prefix_cache") is False else 0
        entries = [[position_logprob(p)] for p in range(cached + 1, len(ids))] + [[0.0]]
        return token_output([0], prompt_logprobs=entries, num_cached_tokens=cached)

    return generate, calls


def expected_jr(total_len: int, answer_len: int) -> float:
    return math.exp(sum(position_logprob(p) for p in range(total_len - answer_len, total_len)))


async def test_prefix_cached_probes_read_the_cache_and_fall_back_per_probe(tokenizer):
    cfg = replace(LIKELIHOOD, prefix_cache=True)
    force_len = len(force_token_ids(tokenizer, cfg))
    answer_len = len(tokenizer.encode("42}", add_special_tokens=False))
    prompt, response, ends = [1, 2, 3], list(range(10, 17)), [2, 4, 7]
    k0_len = len(prompt) + force_len + answer_len

    def cache_hit(ids):
        if len(ids) == k0_len:
            return len(ids) - 1  # the whole probe was cached (e.g. a sibling sample sent it first)
        return len(ids) - force_len - answer_len  # the prompt and the response prefix

    generate, calls = vllm_like_stub(cache_hit)
    result = await compute_progress(prompt, response, ends, "42", cfg, tokenizer, generate)
    assert not result.failed, result.error
    lengths = [len(prompt) + b + force_len + answer_len for b in [0, *ends]]
    assert result.jr == pytest.approx([expected_jr(n, answer_len) for n in lengths])
    assert result.cache_fallbacks == 1

    cached_calls = [p for _, p in calls if p["skip_reading_prefix_cache"] is False]
    fallback_calls = [(ids, p) for ids, p in calls if p["skip_reading_prefix_cache"] is True]
    assert len(calls) == len(ends) + 2 and len(cached_calls) == len(ends) + 1
    assert [len(ids) for ids, _ in fallback_calls] == [k0_len]
    assert all(p == likelihood_params(1, read_prefix_cache=True) for p in cached_calls)
    assert all(p["detokenize"] is False and p["prompt_logprobs"] == 0 for _, p in calls)
    # computed tokens: force + answer per cached probe, 1 for the fully cached one, all of the fallback,
    # plus the one generated token of every request
    expected_tokens = (force_len + answer_len) * len(ends) + 1 + k0_len + len(calls)
    assert result.probe_tokens == expected_tokens


async def test_default_probes_leave_the_cache_switch_unset_and_skip_detokenizing(tokenizer):
    generate, calls = vllm_like_stub(lambda ids: len(ids) - 1)
    result = await compute_progress(
        [1, 2, 3], list(range(10, 17)), [3, 7], "42", LIKELIHOOD, tokenizer, generate
    )
    assert not result.failed, result.error
    assert result.cache_fallbacks == 0 and len(calls) == 3
    # vLLM defaults to skipping its cache for prompt log-probs; releases without the field must accept it
    sent = [p for _, p in calls]
    assert sent == [{"prompt_logprobs": 0, "max_tokens": 1, "temperature": 0.0, "detokenize": False}] * 3
    answer_len = len(tokenizer.encode("42}", add_special_tokens=False))
    assert result.jr == pytest.approx([expected_jr(len(ids), answer_len) for ids, _ in calls])


async def test_prefix_cached_scoring_on_the_hf_server_equals_brute_force_and_falls_back(
    model_dir, model, tokenizer
):
    server = await launch_hf_server(model_dir)
    prompt = chat_prompt(tokenizer)
    generated = await server.generate(
        prompt, {"temperature": 1.0, "max_tokens": 24, "seed": 7, "ignore_eos": True}, "gen"
    )
    response, ends = generated.token_ids, [5, 12, 24]
    sent = []

    async def generate(ids, params):
        sent.append(dict(params))
        return await server.generate(ids, params, "probe")

    cfg = replace(LIKELIHOOD, prefix_cache=True)
    force = force_token_ids(tokenizer, cfg)
    answer = tokenizer.encode("11}", add_special_tokens=False)
    expected = brute_force_jr(model, prompt, response, ends, force, answer)

    first = await compute_progress(prompt, response, ends, "11", cfg, tokenizer, generate, score_max_tokens=0)
    assert not first.failed, first.error
    torch.testing.assert_close(torch.tensor(first.jr), torch.tensor(expected), rtol=1e-4, atol=0)
    assert first.cache_fallbacks == 0
    assert sent == [likelihood_params(0, read_prefix_cache=True)] * (len(ends) + 1)

    # Now the server holds every probe whole, so a cached reply would start inside the answer: each probe
    # is scored again without the cache, to the same values.
    assert len(answer) >= 2
    sent.clear()
    again = await compute_progress(prompt, response, ends, "11", cfg, tokenizer, generate, score_max_tokens=0)
    assert not again.failed, again.error
    assert again.cache_fallbacks == len(ends) + 1
    assert [p["skip_reading_prefix_cache"] for p in sent].count(True) == len(ends) + 1
    torch.testing.assert_close(torch.tensor(again.jr), torch.tensor(expected), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------ timeout


async def test_the_probe_timeout_grows_with_the_number_of_probes(tokenizer):
    cfg = replace(LIKELIHOOD, timeout_s=0.05, timeout_per_probe_s=0.15)

    async def slow(ids, params):
        await asyncio.sleep(0.6)
        return token_output(prompt_logprobs=fake_prompt_logprobs(len(ids)))

    prompt, response = [1, 2, 3], list(range(10, 26))
    many_ends = [2, 4, 6, 8, 10, 12, 14, 16]
    few = await compute_progress(prompt, response, [16], "42", cfg, tokenizer, slow)  # 2 probes: 0.35 s
    assert few.failed and "TimeoutError" in few.error and "2 probes" in few.error
    many = await compute_progress(prompt, response, many_ends, "42", cfg, tokenizer, slow)  # 9: 1.4 s
    assert not many.failed, many.error
    assert len(many.jr) == 9
    flat = replace(cfg, timeout_per_probe_s=0.0)  # the same response under a budget that ignores K
    assert (await compute_progress(prompt, response, many_ends, "42", flat, tokenizer, slow)).failed


async def test_a_hung_probe_still_times_out_under_the_scaled_budget(tokenizer):
    cfg = replace(LIKELIHOOD, timeout_s=0.1, timeout_per_probe_s=0.05)
    force_len = len(force_token_ids(tokenizer, cfg))
    answer_len = len(tokenizer.encode("42}", add_special_tokens=False))
    ends = [2, 4, 6, 8, 10, 12, 14, 16]
    generate, _ = likelihood_stub(hang_at_len=3 + 6 + force_len + answer_len)
    result = await compute_progress([1, 2, 3], list(range(10, 26)), ends, "42", cfg, tokenizer, generate)
    assert result.failed and result.jr == []
    assert "TimeoutError: 1 of 9 probes unfinished after 0.55s" in result.error
    assert "timeout_per_probe_s=0.05 x 9 probes" in result.error
    assert 0.5 <= result.probe_time_s < 5
