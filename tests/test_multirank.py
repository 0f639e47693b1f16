"""Two data-parallel ranks (gloo, FSDP2) give the same per-sample penalties and advantages as one.

The actor's path is run as the worker runs it (:mod:`l2t_verl.worker_extension`): each rank
gathers the full proxy matrices with ``full_tensor()`` (a collective), builds the same rank-r
update, and computes the forward-mode penalties of its own half of the batch through the
FSDP2-sharded model. The driver's part (``l2t_verl.step.l2t_step``: the penalty scale, the process
rewards, the advantage) then runs on the gathered penalties. One process without FSDP is the reference.
"""

from __future__ import annotations

import os
import socket
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from l2t_verl.engine_penalty import full_fp32
from l2t_verl.episodes import episode_ids_for
from l2t_verl.penalty import LowRankUpdate, episode_penalties, last_layer_mlp_regex, select_proxy_params
from l2t_verl.record import SampleRecord
from l2t_verl.settings import L2TConfig
from l2t_verl.step import l2t_step

pytestmark = pytest.mark.slow  # several processes / a subprocess each

BATCH, PROMPT, K_MAX, RANK, DAMPING = 8, 6, 6, 4, 1e-5
RESPONSE_LENS = [14, 9, 17, 12, 5, 16, 11, 8]
EPISODE_ENDS = [[4, 9, 14], [9], [3, 7, 12, 17], [6, 12], [5], [2, 8, 13, 16], [4, 11], [3, 6, 8]]


def _model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config).double().eval()
    # HF's RMSNorm (and eager attention's softmax) round through fp32 whatever the model dtype;
    # micro-batches of other shapes then differ at fp32 level. Same-dtype norms and sdpa keep the
    # comparison at fp64 level.
    for module in model.modules():
        if isinstance(module, Qwen2RMSNorm):
            module.forward = types.MethodType(_exact_dtype_rms_norm, module)
    return model


def _exact_dtype_rms_norm(self: Qwen2RMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """P "before the last update": the current P minus a fixed random step."""
    gen = torch.Generator().manual_seed(1)
    proxy = select_proxy_params(model, last_layer_mlp_regex(model))
    return {
        n: p.detach().clone() - 1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        for n, p in proxy.items()
    }


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + response rows and their episode ids, as the worker builds them."""
    gen = torch.Generator().manual_seed(2)
    width = PROMPT + max(RESPONSE_LENS)
    ids = torch.zeros(BATCH, width, dtype=torch.long)
    mask = torch.zeros(BATCH, width, dtype=torch.long)
    episodes = torch.full((BATCH, width), -1, dtype=torch.long)
    for i, (n, ends) in enumerate(zip(RESPONSE_LENS, EPISODE_ENDS, strict=True)):
        ids[i, : PROMPT + n] = torch.randint(1, 64, (PROMPT + n,), generator=gen)
        mask[i, : PROMPT + n] = 1
        episodes[i, PROMPT : PROMPT + n] = torch.tensor(episode_ids_for(n, ends))
    return ids, mask, episodes


def _penalties(
    model: torch.nn.Module, current: dict, reference: dict, rows: slice, method: str = "forward_ad"
) -> torch.Tensor:
    update = LowRankUpdate.from_tensors(current, reference, rank=RANK, seed=0)
    ids, mask, episodes = _batch()
    return episode_penalties(
        model,
        update,
        ids[rows],
        mask[rows],
        episodes[rows],
        damping=DAMPING,
        method=method,
        k_max=K_MAX,
        max_tokens=40,  # several micro-batches per rank, each trimmed to its own longest row
    )


def _rank_main(rank: int, world: int, port: int, out: str, method: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        reference = _reference(model)
        # verl's apply_fsdp2 layout for an untied model: every decoder layer, the embeddings and the
        # output layer get their own FSDP unit, so the output layer's weight is only whole inside its
        # own forward (where the penalty reads it).
        # Every unit frees its gathered weights after its forward, the root too: verl passes
        # reshard_after_forward=True to all of them (torch's own default keeps the root's).
        for layer in model.model.layers:
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(model.model.embed_tokens, reshard_after_forward=True)
        fully_shard(model.lm_head, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=True)
        proxy = select_proxy_params(model, last_layer_mlp_regex(model))
        current = {name: full_fp32(p).double() for name, p in sorted(proxy.items())}
        per_rank = BATCH // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        penalties = _penalties(model, current, reference, rows, method)
        # The model is still usable for training afterwards: no gradient was left on any parameter,
        # and a normal forward + backward runs (the reverse method's partial backward went through
        # FSDP's backward hooks).
        assert all(p.grad is None for p in model.parameters())
        ids, mask, _ = _batch()
        model.train()
        model(input_ids=ids[rows], attention_mask=mask[rows]).logits.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        local_rows = {name: p.to_local().shape[0] for name, p in proxy.items()}
        torch.save({"penalties": penalties, "local_rows": local_rows}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _advantages(raw: torch.Tensor) -> torch.Tensor:
    """The driver's step 5 (``l2t_verl.step.l2t_step``, as the trainer runs it) on fixed J_r and outcomes."""
    gen = torch.Generator().manual_seed(3)
    records = []
    for ends in EPISODE_ENDS:
        jr = torch.rand(len(ends) + 1, generator=gen).tolist()
        records.append(
            SampleRecord(tuple(ends), tuple(jr), tuple(b - a for a, b in zip(jr, jr[1:], strict=False)))
        )
    outcome = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    width = max(RESPONSE_LENS)
    mask = (torch.arange(width)[None, :] < torch.tensor(RESPONSE_LENS)[:, None]).float()
    index = np.array(["a", "a", "b", "b", "c", "c", "d", "d"], dtype=object)
    cfg = L2TConfig.from_config({"episodes": {"max_episodes": K_MAX}})
    result = l2t_step(records, outcome, mask, index, cfg, raw_penalties=raw.float())
    assert result.metrics["l2t/adv_process_std"] > 0 and result.metrics["l2t/penalty_mean"] > 0
    return result.advantages


@pytest.mark.parametrize("method", ["forward_ad", "reverse"])
def test_two_fsdp_ranks_match_one_process(tmp_path, method):
    model = _model()
    reference = _reference(model)
    current = {
        n: p.detach().clone() for n, p in select_proxy_params(model, last_layer_mlp_regex(model)).items()
    }
    single = _penalties(model, current, reference, slice(None), method)
    assert (single[:, 0] > 0).all() and single[:, 0].std() > 0  # a real, sample-dependent signal

    mp.start_processes(
        _rank_main, args=(2, _free_port(), str(tmp_path), method), nprocs=2, join=True, start_method="spawn"
    )
    outputs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # The sharding is real: each rank holds half of every proxy matrix, which is why the worker
    # gathers P with full_tensor() before building the update.
    for out in outputs:
        assert out["local_rows"] == {n: current[n].shape[0] // 2 for n in current}
    sharded = torch.cat([out["penalties"] for out in outputs])

    assert sharded.shape == single.shape == (BATCH, K_MAX)
    torch.testing.assert_close(sharded, single, rtol=1e-9, atol=1e-15)
    # Episodes a sample does not have stay exactly 0 on every rank.
    for i, ends in enumerate(EPISODE_ENDS):
        assert (sharded[i, len(ends) :] == 0).all()
    torch.testing.assert_close(_advantages(sharded), _advantages(single), rtol=1e-6, atol=1e-6)
