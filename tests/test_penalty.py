"""Tests of the compression penalty (docs/method.md §3): the fast paths against the literal eq. 4 form."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from l2t_verl.penalty import (
    LowRankUpdate,
    auto_method,
    chunked_token_logprobs,
    decoder_layer_indices,
    episode_penalties,
    episode_penalties_exact,
    last_layer_mlp_regex,
    random_layer_regex,
    select_proxy_params,
    token_budget_groups,
)

# torch's first forward-AD call jit-scripts its jvp decompositions, which warns on torch >= 2.10.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

VOCAB = 64
LAST_MLP = r"layers\.1\.mlp\."
# Proxies before an attention layer: tangents reach SDPA, whose fused CPU kernel has no forward-AD
# rule, so this also covers the math-kernel retry of the jvp path.
EARLY = r"layers\.0\.(mlp\.(gate|down)_proj|self_attn\.q_proj)"


def _exact_dtype_rms_norm(self: Qwen2RMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def tiny_model(dtype: torch.dtype = torch.float64, layers: int = 2, seed: int = 0) -> Qwen2ForCausalLM:
    """A random 2-layer Qwen2 built offline. HF's RMSNorm computes in fp32 whatever the model dtype,
    which would cap an fp64 comparison at ~1e-7; the norms are swapped for a same-dtype version so
    the fp64 tests measure the method, not HF's casts."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
        initializer_range=0.2,  # logits far from uniform, so the derivatives are not tiny
        use_cache=False,
    )
    model = Qwen2ForCausalLM(config).to(dtype)
    for module in model.modules():
        if isinstance(module, Qwen2RMSNorm):
            module.forward = types.MethodType(_exact_dtype_rms_norm, module)
    return model.eval()


def perturbed_reference(model: nn.Module, regex: str, scale: float = 0.05, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: p.detach() - scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        for name, p in select_proxy_params(model, regex).items()
    }


def make_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 samples: two episodes; one episode; none. Right-padded sample 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    episodes = torch.full_like(ids, -1)
    episodes[0, 3:7] = 0
    episodes[0, 7:12] = 1
    episodes[1, 4:10] = 0
    return ids, mask, episodes


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest element-wise relative error over the slots that hold an episode."""
    held = reference != 0
    assert torch.equal(value[~held], torch.zeros_like(value[~held]))
    return ((value - reference).abs()[held] / reference.abs()[held]).max().item()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key


# --------------------------------------------------------------------------------------------------
# Fast paths against the exact reference


@pytest.mark.parametrize("regex", [LAST_MLP, EARLY])
def test_jvp_matches_exact_float64(regex: str) -> None:
    model = tiny_model(torch.float64)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, regex), modules=regex, rank=2)
    ids, mask, episodes = make_batch()
    exact = episode_penalties_exact(model, update, ids, mask, episodes, damping=1e-3)
    fast = episode_penalties(model, update, ids, mask, episodes, damping=1e-3)
    assert fast.shape == exact.shape == (3, 2)
    assert fast.dtype == torch.float64
    assert rel_err(fast, exact) <= 1e-6
    assert (exact[0] > 0).all() and exact[1, 0] > 0


@pytest.mark.parametrize("regex", [LAST_MLP, EARLY])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_forward_ad_hooks_match_exact(regex: str, dtype: torch.dtype, tol: float) -> None:
    model = tiny_model(dtype)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, regex), modules=regex, rank=2)
    ids, mask, episodes = make_batch()
    before = snapshot(model)
    fast = episode_penalties(model, update, ids, mask, episodes, damping=1e-3, method="forward_ad")
    assert rel_err(fast, episode_penalties_exact(model, update, ids, mask, episodes, damping=1e-3)) <= tol
    assert_unchanged(model, before)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_forward_ad_rejects_non_linear_proxies() -> None:
    model = tiny_model(torch.float64)
    embed = r"embed_tokens\.weight"
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, embed), modules=embed, rank=1)
    ids, mask, episodes = make_batch()
    with pytest.raises(ValueError, match="nn.Linear"):
        episode_penalties(model, update, ids, mask, episodes, method="forward_ad")


def test_jvp_matches_exact_float32() -> None:
    model = tiny_model(torch.float32)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, EARLY), modules=EARLY, rank=2)
    ids, mask, episodes = make_batch()
    fast = episode_penalties(model, update, ids, mask, episodes)
    assert fast.dtype == torch.float32
    assert rel_err(fast, episode_penalties_exact(model, update, ids, mask, episodes)) <= 1e-3
    # Also against the fp64 truth of the same weights and update.
    exact64 = episode_penalties_exact(copy.deepcopy(model).double(), update, ids, mask, episodes)
    assert rel_err(fast.double(), exact64) <= 1e-3


@pytest.mark.parametrize("regex", [LAST_MLP, EARLY])
def test_finite_difference_matches_exact(regex: str) -> None:
    """Documented tolerances: fp64 (default eps 6e-6) 1e-6; fp32 (default eps 5e-3) 3e-2."""
    model64 = tiny_model(torch.float64)
    update = LowRankUpdate.from_weights(model64, perturbed_reference(model64, regex), modules=regex, rank=2)
    ids, mask, episodes = make_batch()
    exact = episode_penalties_exact(model64, update, ids, mask, episodes)
    fd64 = episode_penalties(model64, update, ids, mask, episodes, method="finite_difference")
    assert rel_err(fd64, exact) <= 1e-6

    model32 = copy.deepcopy(model64).float()
    fd32 = episode_penalties(model32, update, ids, mask, episodes, method="finite_difference")
    assert fd32.dtype == torch.float32
    assert rel_err(fd32.double(), exact) <= 3e-2


def test_bfloat16_model() -> None:
    """bf16 runs in both paths (FD upcasts the P modules) and stays near the fp64 truth, norm-wise."""
    model = tiny_model(torch.bfloat16)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=2)
    ids, mask, episodes = make_batch()
    exact = episode_penalties_exact(copy.deepcopy(model).double(), update, ids, mask, episodes)
    before = snapshot(model)
    for method, tol in (("jvp", 0.05), ("finite_difference", 0.1)):
        value = episode_penalties(model, update, ids, mask, episodes, method=method)
        assert value.dtype == torch.float32
        assert ((value.double() - exact).norm() / exact.norm()).item() <= tol, method
    assert_unchanged(model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class _OldStyleSquare(torch.autograd.Function):
    """An op with a backward but no forward-AD rule, written like flash_attn's (forward(ctx, ...))."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _NewStyleSquare(torch.autograd.Function):
    """The same with setup_context: functorch accepts it, then finds no jvp."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _ToyLM(nn.Module):
    """Not a transformers model: anything with forward(input_ids, attention_mask) -> .logits works."""

    def __init__(self, square: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.square = square
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> types.SimpleNamespace:
        hidden = self.square.apply(self.proj(self.embed(input_ids)))
        return types.SimpleNamespace(logits=self.head(hidden.cumsum(1) * attention_mask[..., None]))


@pytest.mark.parametrize("square", [_OldStyleSquare, _NewStyleSquare])
def test_model_without_forward_ad(square: type[torch.autograd.Function]) -> None:
    model = _ToyLM(square).double()
    reference = {"proj.weight": model.proj.weight.detach() + 0.1}
    update = LowRankUpdate.from_weights(model, reference, modules=r"^proj\.", rank=1)
    ids, mask, episodes = make_batch()
    with pytest.raises(RuntimeError, match="finite_difference"):
        episode_penalties(model, update, ids, mask, episodes)
    exact = episode_penalties_exact(model, update, ids, mask, episodes)
    fd = episode_penalties(model, update, ids, mask, episodes, method="finite_difference")
    assert rel_err(fd, exact) <= 1e-6


# --------------------------------------------------------------------------------------------------
# Batch layout


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_unpadded_samples(side: str) -> None:
    model = tiny_model(torch.float64)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=3)
    gen = torch.Generator().manual_seed(3)
    lengths = (9, 14, 6)
    width = max(lengths) + 2
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    episodes = torch.full_like(ids, -1)
    expected = torch.zeros(len(lengths), 3, dtype=torch.float64)
    for row, length in enumerate(lengths):
        tokens = torch.randint(0, VOCAB, (length,), generator=gen)
        own = torch.full((length,), -1)
        own[2 : length // 2] = 0
        if row == 1:  # the only sample with three episodes
            own[length // 2 : length - 3] = 1
            own[length - 3 :] = 2
        alone = episode_penalties(model, update, tokens[None], torch.ones(1, length), own[None])
        expected[row, : alone.shape[1]] = alone[0]
        span = slice(width - length, width) if side == "left" else slice(0, length)
        ids[row, span], mask[row, span], episodes[row, span] = tokens, 1, own
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    for fn in (episode_penalties, episode_penalties_exact):
        value = fn(model, update, ids, mask, episodes, position_ids=position_ids)
        assert value.shape == (3, 3)
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=0.0)
    assert (expected[[0, 2], 1:] == 0).all()


def test_missing_episodes_and_widths() -> None:
    model = tiny_model(torch.float64)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=2)
    ids, mask, episodes = make_batch()
    episodes[0, 7:9] = 2  # sample 0 now has episodes 0, 1 and 2; sample 1 only 0; sample 2 none
    value = episode_penalties(model, update, ids, mask, episodes)
    assert value.shape == (3, 3)
    assert (value[0] > 0).all() and value[1, 0] > 0
    assert (value[1, 1:] == 0).all() and (value[2] == 0).all()

    gap = episodes.clone()
    gap[gap == 1] = 3  # episode ids need not be contiguous: slot 1 of sample 0 stays empty
    wide = episode_penalties(model, update, ids, mask, gap, k_max=6)
    assert wide.shape == (3, 6)
    assert wide[0, 1] == 0 and wide[0, 3] > 0 and (wide[:, 4:] == 0).all()

    none = torch.full_like(ids, -1)
    for fn in (episode_penalties, episode_penalties_exact):
        assert fn(model, update, ids, mask, none).shape == (3, 0)
        assert fn(model, update, ids, mask, none, k_max=2).eq(0).all()
    with pytest.raises(ValueError, match="k_max"):
        episode_penalties(model, update, ids, mask, episodes, k_max=2)
    with pytest.raises(ValueError, match="k_max"):
        episode_penalties(model, update, ids, mask, none, k_max=-1)


def test_zero_update_gives_exact_zeros() -> None:
    model = tiny_model(torch.float32)
    ids, mask, episodes = make_batch()
    same = {n: p.detach().clone() for n, p in select_proxy_params(model, LAST_MLP).items()}
    for update in (
        LowRankUpdate.from_weights(model, same, modules=LAST_MLP, rank=4),
        LowRankUpdate.zero(model, LAST_MLP, rank=4),
    ):
        assert update.is_zero
        assert update.sq_norm().item() == 0.0
        for method in ("jvp", "finite_difference"):
            value = episode_penalties(model, update, ids, mask, episodes, method=method)
            assert torch.equal(value, torch.zeros(3, 2))
        assert torch.equal(episode_penalties_exact(model, update, ids, mask, episodes), torch.zeros(3, 2))


def test_nonfinite_update_is_passed_through() -> None:
    """Non-finite values are not repaired here: the caller counts them (docs/method.md §8)."""
    model = tiny_model(torch.float32)
    reference = perturbed_reference(model, LAST_MLP)
    name = next(iter(reference))
    reference[name] = reference[name].clone()
    reference[name][0, 0] = float("nan")
    update = LowRankUpdate.from_weights(model, reference, modules=LAST_MLP, rank=2)
    ids, mask, episodes = make_batch()
    value = episode_penalties(model, update, ids, mask, episodes)
    assert value[0].isnan().all() and value[1, 0].isnan()
    assert value[1, 1] == 0 and (value[2] == 0).all()


# --------------------------------------------------------------------------------------------------
# Low-rank update


def _rank2_update(m: int = 12, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    q_left = torch.linalg.qr(torch.randn(m, 2, generator=gen, dtype=torch.float64)).Q
    q_right = torch.linalg.qr(torch.randn(n, 2, generator=gen, dtype=torch.float64)).Q
    top = 3.0 * torch.outer(q_left[:, 0], q_right[:, 0])
    return top + 0.5 * torch.outer(q_left[:, 1], q_right[:, 1]), top


@pytest.mark.parametrize("svd", ["auto", "exact", "randomized"])
def test_rank_truncation(svd: str) -> None:
    delta, top = _rank2_update()
    base = torch.randn(delta.shape, dtype=torch.float64)
    current, reference = {"w": base + delta}, {"w": base}
    full = LowRankUpdate.from_tensors(current, reference, rank=100, svd=svd)
    assert full.factors["w"][0].shape == (12, 7) and full.factors["w"][1].shape == (7, 7)  # rank clipped
    torch.testing.assert_close(full.dense("w"), delta, rtol=0, atol=1e-12)
    one = LowRankUpdate.from_tensors(current, reference, rank=1, svd=svd)
    torch.testing.assert_close(one.dense("w"), top, rtol=0, atol=1e-12)
    torch.testing.assert_close(one.sq_norm(), top.square().sum(), rtol=1e-12, atol=0)


def test_randomized_svd_is_seeded_and_accurate() -> None:
    gen = torch.Generator().manual_seed(7)
    spectrum = 0.5 ** torch.arange(40, dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(300, 40, generator=gen, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(200, 40, generator=gen, dtype=torch.float64)).Q
    delta = (left * spectrum) @ right.T
    current, reference = {"w": delta}, {"w": torch.zeros_like(delta)}
    exact = LowRankUpdate.from_tensors(current, reference, rank=4, svd="exact")
    first = LowRankUpdate.from_tensors(current, reference, rank=4, svd="randomized", seed=3)
    again = LowRankUpdate.from_tensors(current, reference, rank=4, svd="randomized", seed=3)
    assert torch.equal(first.dense("w"), again.dense("w"))  # same dW_r on every data-parallel rank
    torch.testing.assert_close(first.dense("w"), exact.dense("w"), rtol=0, atol=1e-9)


def test_update_accessors() -> None:
    model = tiny_model(torch.bfloat16)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=3)
    assert update.names == (
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    )
    assert update.rank == 3 and not update.is_zero
    dense = [update.dense(n) for n in update.names]
    assert all(d.dtype == torch.float32 for d in dense)  # bf16 weights are differenced in fp32
    assert [tuple(d.shape) for d in dense] == [(32, 16), (32, 16), (16, 32)]
    assert all(torch.linalg.matrix_rank(d, rtol=1e-5) == 3 for d in dense)
    torch.testing.assert_close(update.sq_norm(), sum(d.square().sum() for d in dense), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------------
# The model is left alone; cost does not grow with K


@pytest.mark.parametrize(
    ("method", "training"), [("jvp", True), ("finite_difference", False), ("exact", True)]
)
def test_model_unchanged_and_mode_preserved(method: str, training: bool) -> None:
    model = tiny_model(torch.float32)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, EARLY), modules=EARLY, rank=2)
    model.train(training)
    model.model.layers[0].mlp.train(not training)  # mixed flags must come back as they were
    flags = [m.training for m in model.modules()]
    grad_flags = [p.requires_grad for p in model.parameters()]
    before = snapshot(model)
    ids, mask, episodes = make_batch()
    if method == "exact":
        episode_penalties_exact(model, update, ids, mask, episodes)
    else:
        episode_penalties(model, update, ids, mask, episodes, method=method)
    assert_unchanged(model, before)
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grad_flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["jvp", "finite_difference"])
def test_model_restored_after_exception(method: str) -> None:
    model = tiny_model(torch.bfloat16)  # bf16 FD also installs (and must remove) upcast hooks
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=2)
    model.train()
    before = snapshot(model)

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    handle = model.model.norm.register_forward_pre_hook(boom)
    ids, mask, episodes = make_batch()
    with pytest.raises(RuntimeError, match="boom"):
        episode_penalties(model, update, ids, mask, episodes, method=method)
    handle.remove()
    assert_unchanged(model, before)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("num_episodes", [1, 4, 16])
@pytest.mark.parametrize(("method", "forwards"), [("jvp", 1), ("forward_ad", 1), ("finite_difference", 2)])
def test_forward_count_does_not_grow_with_k(num_episodes: int, method: str, forwards: int) -> None:
    model = tiny_model(torch.float32)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=2)
    gen = torch.Generator().manual_seed(num_episodes)
    ids = torch.randint(0, VOCAB, (2, 40), generator=gen)
    episodes = torch.full_like(ids, -1)
    episodes[:, 4:36] = torch.arange(32) * num_episodes // 32
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        value = episode_penalties(model, update, ids, torch.ones_like(ids), episodes, method=method)
    finally:
        handle.remove()
    assert value.shape == (2, num_episodes) and (value > 0).all()
    assert len(calls) == forwards


# --------------------------------------------------------------------------------------------------
# Proxy selection helpers


def test_last_layer_and_random_layer_regexes() -> None:
    model = tiny_model(torch.float32, layers=10)
    assert decoder_layer_indices(model) == list(range(10))
    last = select_proxy_params(model, last_layer_mlp_regex(model))
    assert sorted(last) == [f"model.layers.9.mlp.{p}_proj.weight" for p in ("down", "gate", "up")]

    regex = random_layer_regex(model, fraction=0.3, seed=11)
    assert regex == random_layer_regex(model, fraction=0.3, seed=11)  # same on every rank
    chosen = select_proxy_params(model, regex)
    layers = {int(name.split(".")[2]) for name in chosen}
    assert len(layers) == 3 and len(chosen) == 9
    assert all(".mlp." in name for name in chosen)
    picks = {random_layer_regex(model, fraction=0.3, seed=s) for s in range(8)}
    assert len(picks) > 1
    assert (
        len({int(n.split(".")[2]) for n in select_proxy_params(model, random_layer_regex(model, 0.01))}) == 1
    )
    with pytest.raises(ValueError, match="fraction"):
        random_layer_regex(model, fraction=0.0)
    with pytest.raises(ValueError, match="decoder layers"):
        random_layer_regex(nn.Sequential(nn.Linear(3, 3)))


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_proxy_and_reference() -> None:
    model = tiny_model(torch.float32)
    with pytest.raises(ValueError, match=r"no_such_module"):
        select_proxy_params(model, r"no_such_module")
    with pytest.raises(ValueError, match="norm"):  # 1-D weights never count
        select_proxy_params(model, r"layernorm")
    with pytest.raises(ValueError, match="invalid proxy regex"):
        select_proxy_params(model, r"layers\.(")
    with pytest.raises(ValueError, match=r"no_such_module"):
        LowRankUpdate.from_weights(model, {}, modules=r"no_such_module", rank=2)

    reference = perturbed_reference(model, LAST_MLP)
    missing = dict(reference)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        LowRankUpdate.from_weights(model, missing, modules=LAST_MLP, rank=2)
    wrong = dict(reference)
    wrong["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 16)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        LowRankUpdate.from_weights(model, wrong, modules=LAST_MLP, rank=2)
    with pytest.raises(ValueError, match="svd method"):
        LowRankUpdate.from_weights(model, reference, modules=LAST_MLP, rank=2, svd="qr")  # type: ignore[arg-type]
    for rank in (0, -1, 1.5):
        with pytest.raises(ValueError, match="rank"):
            LowRankUpdate.from_weights(model, reference, modules=LAST_MLP, rank=rank)  # type: ignore[arg-type]


def test_bad_batch_and_options() -> None:
    model = tiny_model(torch.float32)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=2)
    ids, mask, episodes = make_batch()
    for fn in (episode_penalties, episode_penalties_exact):
        with pytest.raises(ValueError, match="episode_ids shape"):
            fn(model, update, ids, mask, episodes[:, :-1])
        with pytest.raises(ValueError, match="attention_mask shape"):
            fn(model, update, ids, mask[:2], episodes)
    bad_first = episodes.clone()
    bad_first[0, 0] = 0
    with pytest.raises(ValueError, match=r"episode_ids\[:, 0\]"):
        episode_penalties(model, update, ids, mask, bad_first)
    on_padding = episodes.clone()
    on_padding[1, 11] = 0
    with pytest.raises(ValueError, match="padding"):
        episode_penalties(model, update, ids, mask, on_padding)
    with pytest.raises(ValueError, match="integer"):
        episode_penalties(model, update, ids, mask, episodes.float())
    with pytest.raises(ValueError, match=">= 0"):
        episode_penalties(model, update, ids, mask, episodes - 1)
    with pytest.raises(ValueError, match="damping"):
        episode_penalties(model, update, ids, mask, episodes, damping=-1.0)
    with pytest.raises(ValueError, match="method"):
        episode_penalties(model, update, ids, mask, episodes, method="adjoint")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        episode_penalties(model, update, ids, mask, episodes, method="finite_difference", eps=0.0)
    with pytest.raises(ValueError, match="T >= 1"):
        episode_penalties(model, update, ids[:, :0], mask[:, :0], episodes[:, :0])
    with pytest.raises(ValueError, match="max_proxy_numel"):
        episode_penalties_exact(model, update, ids, mask, episodes, max_proxy_numel=100)

    other = LowRankUpdate.from_tensors(
        {"lm_head.weight": torch.ones(3, 3)}, {"lm_head.weight": torch.zeros(3, 3)}, 1
    )
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        episode_penalties(model, other, ids, mask, episodes)
    stranger = LowRankUpdate.from_tensors(
        {"not.a.param": torch.ones(3, 3)}, {"not.a.param": torch.zeros(3, 3)}, 1
    )
    with pytest.raises(ValueError, match=r"not\.a\.param"):
        episode_penalties(model, stranger, ids, mask, episodes)


# --------------------------------------------------------------------------------------------------
# Reverse mode, chunked output layer, token-budget micro-batches


@pytest.mark.parametrize(
    "regex", [LAST_MLP, r"layers\.1\.mlp\.down_proj", r"layers\.1\.self_attn\.o_proj", r"layers\.1\."]
)
def test_reverse_matches_exact_float64(regex: str) -> None:
    model = tiny_model(torch.float64)
    if regex == r"layers\.1\.":
        regex = r"layers\.1\.(mlp\.|self_attn\.o_proj)"  # o_proj runs after layer 1's attention mixing
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, regex), modules=regex, rank=2)
    ids, mask, episodes = make_batch()
    exact = episode_penalties_exact(model, update, ids, mask, episodes, damping=1e-3, max_proxy_numel=4096)
    fast = episode_penalties(model, update, ids, mask, episodes, damping=1e-3, method="reverse")
    assert rel_err(fast, exact) <= 1e-9
    assert not any(p.grad is not None for p in model.parameters())
    assert torch.is_grad_enabled()  # pytest runs with grad on: the reverse pass must put it back


@pytest.mark.parametrize(
    "regex",
    [EARLY, r"layers\.0\.mlp\.", r"layers\.1\.self_attn\.q_proj", r"layers\.1\.self_attn\.v_proj"],
)
def test_reverse_refuses_a_proxy_followed_by_attention(regex: str) -> None:
    model = tiny_model(torch.float64)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, regex), modules=regex, rank=2)
    ids, mask, episodes = make_batch()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"method='reverse'.*attention module .*mixes positions"):
        episode_penalties(model, update, ids, mask, episodes, method="reverse")
    assert_unchanged(model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.is_grad_enabled()
    # forward_ad is the method for such proxies, and it is exact there.
    exact = episode_penalties_exact(model, update, ids, mask, episodes, max_proxy_numel=4096)
    fast = episode_penalties(model, update, ids, mask, episodes, method="forward_ad")
    assert rel_err(fast, exact) <= 1e-9


@pytest.mark.parametrize("chunk", [1, 3, 7, 10_000])
def test_chunked_logprobs_equal_unchunked(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    bias = torch.randn(50, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (23,), generator=gen)
    direct = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(chunked_token_logprobs(hidden, weight, bias, targets, chunk), direct, atol=1e-12)
    # Tangents flow through the chunks too: d/de along a direction of the hidden states.
    tangent = torch.randn(23, 16, generator=gen, dtype=torch.float64)

    def unchunked(h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(h @ weight.T + bias, -1).gather(-1, targets[:, None]).squeeze(-1)

    _, want = torch.func.jvp(unchunked, (hidden,), (tangent,))
    _, got = torch.func.jvp(
        lambda h: chunked_token_logprobs(h, weight, bias, targets, chunk), (hidden,), (tangent,)
    )
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("method", ["forward_ad", "reverse", "jvp"])
def test_logit_chunk_and_no_full_logits(method: str) -> None:
    model = tiny_model(torch.float64)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=2)
    ids, mask, episodes = make_batch()
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        whole = episode_penalties(model, update, ids, mask, episodes, method=method, logit_chunk=10_000)
        chunked = episode_penalties(model, update, ids, mask, episodes, method=method, logit_chunk=2)
    finally:
        handle.remove()
    assert torch.allclose(whole, chunked, rtol=1e-10, atol=0)
    assert shapes and all(s[1] == 1 for s in shapes)  # the output layer made logits for one position only


def test_token_budget_groups() -> None:
    lengths = [5, 40, 12, 40, 3, 100, 7]
    groups = token_budget_groups(lengths, max_tokens=80)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= 80 or len(group) == 1
    assert [5] in groups  # longer than the budget: alone
    assert token_budget_groups(lengths, max_tokens=10_000) == [[5, 1, 3, 2, 6, 0, 4]]
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_groups(lengths, max_tokens=0)


@pytest.mark.parametrize("method", ["forward_ad", "reverse"])
def test_token_budget_micro_batches_are_trimmed_and_equal(method: str) -> None:
    model = tiny_model(torch.float64)
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=2)
    gen = torch.Generator().manual_seed(4)
    lengths = [30, 9, 14, 6, 22]
    ids = torch.randint(0, VOCAB, (len(lengths), 32), generator=gen)
    mask = torch.zeros_like(ids)
    episodes = torch.full_like(ids, -1)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        episodes[row, 2:n] = torch.arange(n - 2) * 3 // (n - 2)
    whole = episode_penalties(model, update, ids, mask, episodes, method=method)
    widths = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        split = episode_penalties(model, update, ids, mask, episodes, method=method, max_tokens=40)
    finally:
        handle.remove()
    assert torch.allclose(split, whole, rtol=1e-10, atol=0)
    # budget 40, longest first: [30] [22] [14, 9] [6], each padded to its own longest only
    assert sorted(widths) == sorted([(1, 30), (1, 22), (2, 14), (1, 6)])


def test_forward_ad_runs_flash_configured_models_through_sdpa() -> None:
    """A model configured for flash_attention_2 (no forward-mode rule; not installed on CPU) still gets
    exact forward_ad penalties for a proxy before attention (random_layers), and keeps its config."""
    model = tiny_model(torch.float64)
    model.config._attn_implementation = "flash_attention_2"
    update = LowRankUpdate.from_weights(model, perturbed_reference(model, EARLY), modules=EARLY, rank=2)
    ids, mask, episodes = make_batch()
    fast = episode_penalties(model, update, ids, mask, episodes, method="forward_ad")
    assert model.config._attn_implementation == "flash_attention_2"
    model.config._attn_implementation = "sdpa"
    exact = episode_penalties_exact(model, update, ids, mask, episodes, max_proxy_numel=4096)
    assert rel_err(fast, exact) <= 1e-9
    # The default proxy's tangent never reaches attention: the model keeps its own kernel (on this CPU
    # machine flash-attn is not installed, so using it fails, which shows it was not switched).
    model.config._attn_implementation = "flash_attention_2"
    last = LowRankUpdate.from_weights(model, perturbed_reference(model, LAST_MLP), modules=LAST_MLP, rank=2)
    with pytest.raises(ImportError):
        episode_penalties(model, last, ids, mask, episodes, method="forward_ad")
    assert model.config._attn_implementation == "flash_attention_2"


def test_auto_picks_reverse_only_for_the_last_layer_mlp() -> None:
    model = tiny_model(torch.float64)
    for regex, expected in (
        (LAST_MLP, "reverse"),
        (r"layers\.1\.mlp\.up_proj", "reverse"),
        (EARLY, "forward_ad"),
    ):
        update = LowRankUpdate.from_weights(model, perturbed_reference(model, regex), modules=regex, rank=2)
        assert auto_method(model, update) == expected
        ids, mask, episodes = make_batch()
        auto = episode_penalties(model, update, ids, mask, episodes, method="auto")
        assert torch.equal(auto, episode_penalties(model, update, ids, mask, episodes, method=expected))
