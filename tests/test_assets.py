"""Tests for l2t_verl.assets: the offline tokenizer, model and data build, its cache and its CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from l2t_verl import arith_task, assets
from l2t_verl.scoring import compute_score

SEED = 3
TRAIN, VAL = 48, 16


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Import cost (seconds) is not what the time bound below measures.
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM  # noqa: F401

    start = time.perf_counter()
    # sft_steps=0: the random model, so the build stays fast; the warm start has its own tests below.
    paths = assets.build_all(
        tmp_path_factory.mktemp("assets"), seed=SEED, train_size=TRAIN, val_size=VAL, sft_steps=0
    )
    # The build itself takes ~0.5 s; the bound is loose so a loaded CI machine does not flake.
    assert time.perf_counter() - start < 10
    return paths


@pytest.fixture(scope="module")
def tokenizer(built: dict[str, Path]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built["model"])


# ------------------------------------------------------------------------------- layout


def test_layout_and_manifest(built: dict[str, Path]) -> None:
    for key in ("model", "train", "test", "manifest"):
        assert built[key].exists(), key
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (built["model"] / name).exists(), name
    manifest = json.loads(built["manifest"].read_text())
    assert manifest["seed"] == SEED
    assert manifest["train_size"] == TRAIN and manifest["val_size"] == VAL
    assert manifest["version"] == assets.ASSETS_VERSION
    assert 100_000 <= manifest["num_parameters"] <= 200_000
    assert manifest["sft"] == {"steps": 0} and manifest["model_overrides"] == {}
    assert "sft_result" not in manifest


def test_rebuild_is_skipped_unless_forced(built: dict[str, Path]) -> None:
    mtime = built["train"].stat().st_mtime_ns
    assets.build_all(built["root"], seed=SEED, train_size=TRAIN, val_size=VAL, sft_steps=0)
    assert built["train"].stat().st_mtime_ns == mtime


def test_force_and_changed_request_rebuild(tmp_path: Path) -> None:
    paths = assets.build_all(tmp_path, seed=0, train_size=8, val_size=4, sft_steps=0)
    assert len(pd.read_parquet(paths["train"])) == 8
    paths = assets.build_all(tmp_path, seed=0, train_size=10, val_size=4, sft_steps=0)
    assert len(pd.read_parquet(paths["train"])) == 10
    mtime = paths["train"].stat().st_mtime_ns
    time.sleep(0.01)
    assets.build_all(tmp_path, seed=0, train_size=10, val_size=4, sft_steps=0, force=True)
    assert paths["train"].stat().st_mtime_ns != mtime


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--output", str(tmp_path), "--seed", "1", "--train-size", "8", "--val-size", "4"]
    rc = assets.main([*argv, "--sft-steps", "0"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)  # stdout is only the JSON (progress goes to stderr)
    assert Path(printed["train"]).exists()
    manifest = json.loads((tmp_path / "assets.json").read_text())
    assert manifest["seed"] == 1 and manifest["sft"] == {"steps": 0}


def test_cli_defaults_match_build_all() -> None:
    import inspect

    args = vars(assets.build_parser().parse_args(["--output", "x"]))
    params = inspect.signature(assets.build_all).parameters
    for name in ("seed", "train_size", "val_size", "vocab_size", "force", "sft_steps", "sft_redundant_max"):
        assert args[name] == params[name].default, name
    assert assets.DEFAULT_SFT_STEPS > 0  # warm-started unless asked otherwise


# ------------------------------------------------------------------------------- warm start


@pytest.mark.slow
def test_warm_start_build_records_settings_and_changes_the_cache_key(tmp_path: Path) -> None:
    random_paths = assets.build_all(tmp_path, seed=0, train_size=8, val_size=4, sft_steps=0)
    train_bytes = random_paths["train"].read_bytes()
    random_weights = (random_paths["model"] / "model.safetensors").read_bytes()

    # A few steps only: this checks the plumbing, not how well the model learns.
    paths = assets.build_all(tmp_path, seed=0, train_size=8, val_size=4, sft_steps=2, sft_redundant_max=2)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["sft"] == {
        "steps": 2,
        "lr": assets.DEFAULT_SFT_LR,
        "batch_size": assets.DEFAULT_SFT_BATCH_SIZE,
        "redundant_max": 2,
        "problems": 2 * assets.DEFAULT_SFT_BATCH_SIZE,
    }
    assert manifest["model_overrides"] == assets.WARM_START_MODEL_OVERRIDES
    result = manifest["sft_result"]
    assert set(result) == {"initial_loss", "final_loss", "test_greedy_accuracy", "test_greedy_mean_tokens"}
    assert 0.0 <= result["test_greedy_accuracy"] <= 1.0
    assert paths["train"].read_bytes() == train_bytes  # the data does not depend on the SFT
    assert (paths["model"] / "model.safetensors").read_bytes() != random_weights

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(paths["model"])
    assert config.hidden_size == assets.WARM_START_MODEL_OVERRIDES["hidden_size"]
    assert manifest["num_parameters"] < 2_000_000

    # Same request: skipped.  Different SFT settings: rebuilt.
    mtime = paths["manifest"].stat().st_mtime_ns
    assets.build_all(tmp_path, seed=0, train_size=8, val_size=4, sft_steps=2, sft_redundant_max=2)
    assert paths["manifest"].stat().st_mtime_ns == mtime
    assets.build_all(tmp_path, seed=0, train_size=8, val_size=4, sft_steps=2, sft_redundant_max=1)
    assert json.loads(paths["manifest"].read_text())["sft"]["redundant_max"] == 1


@pytest.mark.slow
def test_warm_start_build_deterministic_and_overridable(tmp_path: Path) -> None:
    kwargs = {"seed": 0, "train_size": 8, "val_size": 4, "sft_steps": 2}
    a = assets.build_all(tmp_path / "a", **kwargs)
    b = assets.build_all(tmp_path / "b", **kwargs)
    for rel in ("model/model.safetensors", "assets.json"):
        assert (a["root"] / rel).read_bytes() == (b["root"] / rel).read_bytes(), rel

    small = assets.build_all(tmp_path / "c", **kwargs, model_overrides={"num_hidden_layers": 1})
    manifest = json.loads(small["manifest"].read_text())
    assert manifest["model_overrides"] == {"num_hidden_layers": 1}
    assert manifest["num_parameters"] < json.loads(a["manifest"].read_text())["num_parameters"]


def test_build_all_rejects_negative_sft_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sft_steps"):
        assets.build_all(tmp_path, sft_steps=-1)


# ------------------------------------------------------------------------------- tokenizer


def test_tokenizer_basics(tokenizer) -> None:
    assert 512 <= len(tokenizer) <= 1026
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer.convert_tokens_to_ids(tok) is not None


@pytest.mark.parametrize(
    "text",
    [
        "Start at 7. Add 5. Multiply by 3. What is the result?",
        arith_task.worked_solution("Start at 7. Add 5. Multiply by 3. Subtract 4."),
        "unicode: héllo — 你好 🙂\n\n\ttabs  and  spaces",
        "",
    ],
)
def test_tokenizer_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_think_tokens_are_single_and_survive_skip_special(tokenizer) -> None:
    for tok in ("<think>", "</think>"):
        ids = tokenizer.encode(tok, add_special_tokens=False)
        assert len(ids) == 1
        assert tokenizer.convert_ids_to_tokens(ids[0]) == tok
    ids = tokenizer.encode("<think>\n1 + 1 = 2\n</think>\nok<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\n1 + 1 = 2\n</think>\nok"


def test_chat_template(tokenizer) -> None:
    messages = [{"role": "user", "content": "Start at 1. Add 2."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nStart at 1. Add 2.<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_gen == "<|im_start|>user\nStart at 1. Add 2.<|im_end|>\n"

    # transformers 5: tokenize=True returns a BatchEncoding (dict-like) by default ...
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert "input_ids" in enc
    # ... and a flat list[int] with return_dict=False; verl's normalize_token_ids handles both.
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert list(enc["input_ids"]) == ids
    assert tokenizer.decode(ids) == text

    from verl.utils.tokenizer import normalize_token_ids

    assert normalize_token_ids(enc) == ids

    # verl's multimodal-style list content renders the same.
    listy = [{"role": "user", "content": [{"type": "text", "text": "Start at 1. Add 2."}]}]
    assert tokenizer.apply_chat_template(listy, add_generation_prompt=True, tokenize=False) == text


# ------------------------------------------------------------------------------- model


def test_model_loads_and_runs(built: dict[str, Path], tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built["model"])
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert cfg.pad_token_id == tokenizer.pad_token_id == model.generation_config.pad_token_id
    assert cfg.bos_token_id is not None
    assert cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 200_000

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Start at 1. Add 2."}], add_generation_prompt=True, return_dict=False
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), len(tokenizer))
        assert torch.isfinite(logits).all()
        out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= len(ids) + 5


def test_build_model_overrides_and_rng_isolation(tokenizer) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model = assets.build_model(tokenizer, seed=0, num_hidden_layers=1)
    assert torch.rand(1) == before  # building did not consume the caller's RNG
    assert model.config.num_hidden_layers == 1
    again = assets.build_model(tokenizer, seed=0, num_hidden_layers=1)
    other = assets.build_model(tokenizer, seed=1, num_hidden_layers=1)
    w = model.get_input_embeddings().weight
    assert torch.equal(w, again.get_input_embeddings().weight)
    assert not torch.equal(w, other.get_input_embeddings().weight)


# ------------------------------------------------------------------------------- data


def test_parquet_schema(built: dict[str, Path]) -> None:
    for key, n, split in (("train", TRAIN, "train"), ("test", VAL, "test")):
        df = pd.read_parquet(built[key])
        assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        assert len(df) == n
        assert (df["data_source"] == "l2t_arith").all()
        assert (df["ability"] == "math").all()
        for i, row in df.iterrows():
            prompt = list(row["prompt"])
            assert len(prompt) == 1 and isinstance(prompt[0], dict)
            assert prompt[0]["role"] == "user" and "\\boxed{}" in prompt[0]["content"]
            rm = row["reward_model"]
            assert rm["style"] == "rule" and isinstance(rm["ground_truth"], str)
            int(rm["ground_truth"])
            info = row["extra_info"]
            assert info["split"] == split and info["index"] == i
            assert 1 <= info["num_steps"] <= 6
            assert info["tier"] == arith_task.difficulty_tier(info["num_steps"])


def test_train_and_test_are_disjoint(built: dict[str, Path]) -> None:
    train = {p[0]["content"] for p in pd.read_parquet(built["train"])["prompt"]}
    test = {p[0]["content"] for p in pd.read_parquet(built["test"])["prompt"]}
    assert len(train) == TRAIN and len(test) == VAL
    assert not train & test


def test_verl_rlhf_dataset_reads_it(built: dict[str, Path], tokenizer) -> None:
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create(
        {
            "max_prompt_length": 256,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "cache_dir": str(built["root"] / "cache"),
        }
    )
    ds = RLHFDataset(data_files=[str(built["train"])], tokenizer=tokenizer, config=config)
    assert len(ds) == TRAIN  # nothing filtered as overlong/unprocessable
    item = ds[0]
    assert item["raw_prompt"][0]["role"] == "user"
    assert item["reward_model"]["ground_truth"] == str(arith_task.solve(item["raw_prompt"]))


def test_worked_solutions_score_one_for_every_problem(built: dict[str, Path]) -> None:
    rows = arith_task.make_problems(500, seed=11)
    rows += pd.read_parquet(built["train"]).to_dict("records")  # also rows as read back from parquet
    for row in rows:
        solution = arith_task.worked_solution(row)
        assert solution.count("\n\n") == row["extra_info"]["num_steps"] - 1
        gt = row["reward_model"]["ground_truth"]
        assert compute_score(row["data_source"], solution, gt, row["extra_info"]) == 1.0
        assert (
            compute_score(row["data_source"], solution.replace(f"{{{gt}}}", f"{{{int(gt) + 1}}}"), gt) == 0.0
        )


# ------------------------------------------------------------------------------- determinism


def test_build_all_deterministic(built: dict[str, Path], tmp_path: Path) -> None:
    again = assets.build_all(tmp_path, seed=SEED, train_size=TRAIN, val_size=VAL, sft_steps=0)
    for rel in (
        "data/train.parquet",
        "data/test.parquet",
        "model/tokenizer.json",
        "model/config.json",
        "model/model.safetensors",
        "assets.json",
    ):
        assert (built["root"] / rel).read_bytes() == (again["root"] / rel).read_bytes(), rel
