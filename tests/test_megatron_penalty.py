"""The compression penalty on a real megatron-core GPT (CPU, gloo): tensor-, sequence- and pipeline-parallel
ranks give the penalties of the unsharded model, which match one autograd gradient per token.

The rank processes are in tests/megatron_ranks.py. The HF <-> Megatron name mapping and the masters are
tested on their own below.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from l2t_verl.penalty.megatron_layout import MegatronLocation, megatron_location, megatron_proxy_names

mcore = pytest.importorskip("megatron.core", reason="megatron-core (the `megatron` extra) is not installed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, tp: int, pp: int, **options: bool) -> list[dict]:
    import megatron_ranks

    world = tp * pp
    out = tmp_path / "_".join([f"tp{tp}", f"pp{pp}", *sorted(k for k, v in options.items() if v)])
    out.mkdir()
    mp.start_processes(
        megatron_ranks.run,
        args=(world, _port(), tp, pp, options, str(out)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("megatron"), 1, 1)[0]


@pytest.mark.slow
def test_unsharded_reverse_mode_matches_per_token_gradients(unsharded):
    exact = unsharded["exact"]
    assert exact.abs().max() > 1e-6  # the update moves the log-likelihood: a non-trivial comparison
    for key in ("penalties_None", "penalties_20", "backend"):
        torch.testing.assert_close(unsharded[key], exact, rtol=1e-4, atol=1e-9)
    assert unsharded["grads_untouched"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tp", "pp", "options"),
    [(2, 1, {}), (2, 1, {"sequence_parallel": True}), (1, 2, {}), (2, 1, {"fused_norm": True})],
    ids=["tp2", "tp2-sequence-parallel", "pp2", "tp2-fused-norm"],
)
def test_parallel_ranks_match_unsharded(tmp_path, unsharded, tp, pp, options):
    """TE-style fused norm: linear_fc1 normalises its own input (the hook re-applies the norm)."""
    import megatron_ranks

    ranks = _run(tmp_path, tp, pp, **options)
    for rank in ranks:  # every rank, every stage, returns the last stage's penalties
        for key in ("penalties_None", "penalties_20", "backend"):
            torch.testing.assert_close(rank[key], unsharded["exact"], rtol=1e-4, atol=1e-9)
        assert rank["grads_untouched"] and rank["trainable_again"]
        assert rank["backend_zeroed"] == 1  # the backend zeroed the engine's gradients after its backward
    snapshots = [r["backend_snapshot"] for r in ranks]
    assert snapshots.count(sorted(megatron_ranks.PROXY)) == tp  # the last stage's ranks hold P
    last = [r for r in ranks if "hf" in r]
    assert len(last) == tp
    for rank in last:  # the shards reassemble the unsharded HF matrices
        gate, up, down = (rank["hf"][n] for n in megatron_ranks.PROXY)
        torch.testing.assert_close(torch.cat([gate, up]), unsharded["fc1"], rtol=0, atol=0)
        torch.testing.assert_close(down, unsharded["fc2"], rtol=0, atol=0)


@pytest.mark.slow
def test_tied_output_layer(tmp_path):
    """With tied embeddings the output layer gets its (vocabulary-parallel) weight as an argument."""
    one = _run(tmp_path, 1, 1, tied=True)[0]
    for key in ("penalties_None", "penalties_20", "backend"):
        torch.testing.assert_close(one[key], one["exact"], rtol=1e-4, atol=1e-9)
    for rank in _run(tmp_path, 2, 1, tied=True):
        torch.testing.assert_close(rank["penalties_20"], one["exact"], rtol=1e-4, atol=1e-9)


def test_hf_names_map_to_megatron_linears():
    assert megatron_location("model.layers.27.mlp.gate_proj.weight") == MegatronLocation(
        27, "mlp.linear_fc1", "column", 0
    )
    assert megatron_location("model.layers.27.mlp.up_proj.weight").half == 1
    assert megatron_location("model.layers.3.mlp.down_proj.weight") == MegatronLocation(
        3, "mlp.linear_fc2", "row", None
    )
    assert megatron_location("model.layers.0.self_attn.o_proj.weight") == MegatronLocation(
        0, "self_attention.linear_proj", "row", None
    )
    assert megatron_location("model.layers.1.mlp.up_proj.weight", gated=False).half is None
    with pytest.raises(ValueError, match="not gated"):
        megatron_location("model.layers.1.mlp.gate_proj.weight", gated=False)
    with pytest.raises(ValueError, match="q_proj"):
        megatron_location("model.layers.1.self_attn.q_proj.weight")


def test_megatron_proxy_set_in_hf_names():
    mlp = [f"model.layers.27.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert megatron_proxy_names(28) == mlp
    down = megatron_proxy_names(4, modules=r"layers\.3\.mlp\.down")
    assert down == ["model.layers.3.mlp.down_proj.weight"]
    attention = megatron_proxy_names(4, modules=r"layers\.3\.self_attn")
    assert attention == ["model.layers.3.self_attn.o_proj.weight"]
    with pytest.raises(ValueError, match="last decoder layer"):
        megatron_proxy_names(4, modules=r"layers\.2\.mlp")
    with pytest.raises(ValueError, match="matches none"):
        megatron_proxy_names(4, modules="embed_tokens")
    with pytest.raises(ValueError, match="invalid proxy regex"):
        megatron_proxy_names(4, modules="(")


@pytest.mark.slow
def test_fp32_masters_assembled_over_data_parallel_ranks(tmp_path):
    import megatron_ranks

    mp.start_processes(
        megatron_ranks.run_masters,
        args=(2, _port(), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"masters{rank}.pt")
        for value, master in zip(got["values"][:2], got["masters"], strict=True):
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, master, rtol=0, atol=0)  # the fp32 values, not bf16's
            assert not torch.equal(value, master.to(torch.bfloat16).float())
        torch.testing.assert_close(got["values"][2], got["outside"], rtol=0, atol=0)
        assert got["fallbacks"] == 1  # the bf16 parameter without a master is counted
        for value, param in zip(got["aware"], got["params"], strict=True):
            torch.testing.assert_close(value, param, rtol=0, atol=0)
        assert got["aware_fallbacks"] == 3
