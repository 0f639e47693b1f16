"""Offline assets for L2T experiments: a tiny tokenizer and a tiny Qwen2 model for the synthetic
arithmetic task (:mod:`l2t_verl.arith_task`), with its train/test data in verl's parquet schema,
built once and cached on disk.

Nothing here touches the network: the tokenizer is trained on the synthetic corpus and the
model is randomly initialised, then (by default) warm-started with a short CPU SFT on worked
solutions (:mod:`l2t_verl.warm_start`), so the whole pipeline (rollout, reward, RL) can be
exercised on machines that cannot download checkpoints or datasets.

Why the warm start: a random model never writes a ``\\boxed{}`` answer, so every reward is 0 and
GRPO/L2T has nothing to learn from.  After the default SFT (1200 steps, about 60-90 s on two CPU
cores) the model writes ``"\\n\\n"``-separated steps and a boxed answer, and solves roughly
20-35% of the 1-3-step problems when sampling at temperature 1 (35-50% greedy; fewer of the longer
ones): mixed 0/1 rewards.
``--sft-steps 0`` gives the random model of earlier versions (hidden 64, ~124k parameters).

CLI::

    python -m l2t_verl.assets --output DIR [--seed 0] [--train-size 512] [--val-size 64]
        [--sft-steps 1200] [--sft-redundant-max 1] [--force]

Layout written under ``DIR``::

    DIR/model/             tokenizer + Qwen2ForCausalLM (save_pretrained; from_pretrained-loadable)
                           (warm-started unless --sft-steps 0)
    DIR/data/train.parquet
    DIR/data/test.parquet
    DIR/assets.json        manifest; a rebuild is skipped when it matches the requested build

Note on ``apply_chat_template`` (transformers 5.x): with ``tokenize=True`` it returns a
``BatchEncoding`` (a dict with ``input_ids`` / ``attention_mask``) unless ``return_dict=False`` is
passed, in which case it returns a flat ``list[int]``.  verl copes with both through
``verl.utils.tokenizer.normalize_token_ids``; our own code should pass ``return_dict=False``
(or go through that helper) rather than assume either shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from l2t_verl.arith_task import THINK_END, THINK_START, make_problems, worked_solution, write_dataset
from l2t_verl.warm_start import evaluate_greedy, warm_start

if TYPE_CHECKING:  # heavy imports stay lazy: building the data must not pull in torch
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

# Bump when the generator, tokenizer recipe or model recipe changes, so that stale asset
# directories are rebuilt instead of silently reused.
ASSETS_VERSION = 2

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, EOS_TOKEN]
THINK_TOKENS = [THINK_START, THINK_END]

DEFAULT_VOCAB_SIZE = 768
# The tokenizer corpus is a fixed-size sample that depends only on the seed, so the tokenizer
# (and hence token ids / model shapes) does not change when train/val sizes change.
TOKENIZER_CORPUS_PROBLEMS = 3000

# Qwen2's pre-tokenizer regex.  Digits are isolated (\p{N} without "+"), which keeps numbers
# compositional -- far easier for a tiny model doing arithmetic than multi-digit merges.
_QWEN2_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen-style ChatML.  No default system prompt: prompts stay short for a 1024-position model.
# List-style content (verl's multimodal message format) is flattened to its text parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    # transformers 5 renamed ``torch_dtype`` to ``dtype``.
    "dtype": "float32",
}

# The warm start needs a bigger model than the random smoke-test one: at hidden 64 the SFT does
# not learn the arithmetic in time (~6% right at temperature 1 on 1-3-step problems even after
# 2000 steps).  Hidden 128 / 2 layers (~395k parameters) gets there in ~1200 steps; a third layer
# costs 40% more per step for no faster learning.  Applied on top of DEFAULT_MODEL_CONFIG whenever
# sft_steps > 0 and build_all gets no explicit model_overrides.
WARM_START_MODEL_OVERRIDES: dict[str, Any] = {"hidden_size": 128, "intermediate_size": 256}
DEFAULT_SFT_STEPS = 1200
DEFAULT_SFT_LR = 1e-3
DEFAULT_SFT_BATCH_SIZE = 16
# Up to one redundant episode per SFT trace ("Check: ...", "So far we have ..."): the warm-started
# policy over-thinks a little, which is what L2T's dense reward is meant to prune.
DEFAULT_SFT_REDUNDANT_MAX = 1
# Generation budget for the validation check recorded in the manifest; the longest traces (six
# steps plus redundant episodes) take ~110 tokens.
SFT_EVAL_MAX_NEW_TOKENS = 160

# ---------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------


def build_tokenizer(corpus: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it as a Qwen-like PreTrainedTokenizerFast.

    ``vocab_size`` caps the BPE vocabulary (incl. the three ChatML specials); ``<think>`` and
    ``</think>`` are appended after it, so ``len(tokenizer) <= vocab_size + 2``.  A small corpus
    may run out of merges before the cap, which is harmless.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # Full byte alphabet so any text (unicode included) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Non-special (like Qwen3): they must survive ``skip_special_tokens=True`` decoding, because
    # the L2T pipeline parses the think block out of decoded responses.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,  # Qwen2 tokenizers do not prepend a BOS token
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=DEFAULT_MODEL_CONFIG["max_position_embeddings"],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: Any) -> Qwen2ForCausalLM:
    """Randomly initialised tiny Qwen2ForCausalLM matched to ``tokenizer``.

    ``overrides`` update :data:`DEFAULT_MODEL_CONFIG` (e.g. ``num_hidden_layers=4``; the warm-started
    asset model uses :data:`WARM_START_MODEL_OVERRIDES`).  The initialisation is seeded inside
    ``fork_rng`` so building a model does not perturb the caller's global torch RNG.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    cfg = dict(DEFAULT_MODEL_CONFIG)
    cfg.update(
        vocab_size=len(tokenizer),
        # Mirrors Qwen2.5: bos is <|endoftext|> in the config even though it is never prepended.
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    cfg.update(overrides)
    config = Qwen2Config(**cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


# The arithmetic prompts alone use only ~30 distinct words, which leaves BPE ~350 tokens.
# This fixed text adds the vocabulary of free-form reasoning and competition-math answers
# (what rollouts, paraphrased traces and math-verify tests produce), bringing the vocabulary
# into the intended ~512-1024 range.  It is repeated in the corpus so min_frequency is met.
_REASONING_TEXT = """\
Let me think about this problem step by step. First, we start with the initial value.
Next, we apply each operation in order. Then we check the result carefully.
Wait, let me verify that again. Hmm, that does not look right, so I made a mistake.
Actually, the correct computation is different. Let's recompute the previous step.
So the current value becomes the new total. Therefore, the final answer is the last number.
We add, subtract, multiply and divide. The sum, difference, product and quotient are integers.
Double the number, then take half of it. Twice three is six; two plus two equals four.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, hundred.
Zero is even. An odd number plus an odd number gives an even number.
Since the remainder is zero, the division is exact. This means the value stays positive.
We have already computed this, which gives the same result. Good, both agree.
The question asks for the result after all operations. Each step uses the previous value.
In summary, after the last operation we obtain the answer. I am confident it is correct.
Alternatively, we could solve the equation for x. Let x be the unknown and y the other.
Consider the function f(x) and its derivative. The area of the triangle and the circle.
Compute the probability, the expected value, the ratio and the percentage.
The fraction simplifies: $\\frac{1}{2} = 0.5$ and $\\frac{3}{4} = 0.75$, $\\sqrt{2}$, $\\pi$.
Then $a \\cdot b = c$, $2 \\times 3 = 6$, $6 \\div 2 = 3$, $x^2 + y^2 = z^2$, $\\left( 1 + 2 \\right)$.
Hence the solution is \\boxed{42}. The answer is \\boxed{7}. Thus the answer is \\boxed{\\frac{1}{2}}.
Note that we should not overthink: a short and correct reasoning is better than a long one.
The model should stop thinking once the answer is known, and write the answer clearly.
"""


def tokenizer_corpus(seed: int, n: int = TOKENIZER_CORPUS_PROBLEMS) -> list[str]:
    """Prompts, worked solutions, chat-role words and generic reasoning text."""
    problems = make_problems(n, seed, split="tokenizer")
    corpus = ["system", "user", "assistant"] + _REASONING_TEXT.splitlines() * 4
    for row in problems:
        corpus.append(row["prompt"][0]["content"])
        corpus.append(worked_solution(row))
    return corpus


def _paths(output: Path) -> dict[str, Path]:
    return {
        "root": output,
        "model": output / "model",
        "train": output / "data" / "train.parquet",
        "test": output / "data" / "test.parquet",
        "manifest": output / "assets.json",
    }


def _manifest_key(
    seed: int,
    train_size: int,
    val_size: int,
    vocab_size: int,
    model_overrides: dict[str, Any],
    sft: dict[str, Any],
) -> dict[str, Any]:
    # Everything that changes the produced files belongs here, so that a different request never
    # reuses a stale build.  Values must survive a JSON round trip unchanged (compared as loaded).
    return {
        "version": ASSETS_VERSION,
        "seed": seed,
        "train_size": train_size,
        "val_size": val_size,
        "requested_vocab_size": vocab_size,
        "model_overrides": dict(sorted(model_overrides.items())),
        "sft": sft,
    }


def _is_up_to_date(paths: dict[str, Path], key: dict[str, Any]) -> bool:
    try:
        manifest = json.loads(paths["manifest"].read_text())
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in key.items()):
        return False
    required = [
        paths["train"],
        paths["test"],
        paths["model"] / "config.json",
        paths["model"] / "tokenizer.json",
    ]
    return all(p.exists() for p in required)


def build_all(
    output: str | Path,
    seed: int = 0,
    train_size: int = 512,
    val_size: int = 64,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    force: bool = False,
    sft_steps: int = DEFAULT_SFT_STEPS,
    sft_redundant_max: int = DEFAULT_SFT_REDUNDANT_MAX,
    sft_lr: float = DEFAULT_SFT_LR,
    sft_batch_size: int = DEFAULT_SFT_BATCH_SIZE,
    sft_redundant_per_gap: int = 0,
    model_overrides: dict[str, Any] | None = None,
    min_steps: int = 1,
    max_steps: int = 6,
) -> dict[str, Path]:
    """Build every asset under ``output`` and return their paths
    (keys: root, model, train, test, manifest).

    ``sft_steps > 0`` warm-starts the model with :func:`l2t_verl.warm_start.warm_start` on
    ``sft_steps * sft_batch_size`` problems of their own split (``"sft"``, same 1-6-step
    distribution as train, disjoint from the train and test prompts, so RL is not evaluated on
    memorised problems), then records the SFT settings, losses and a greedy check on the test
    split in ``assets.json``.  ``sft_steps=0`` keeps the random model.

    ``min_steps``/``max_steps`` bound the operations per problem of every split; ``sft_redundant_per_gap``
    switches the SFT traces to per-gap redundancy (:func:`l2t_verl.warm_start.sft_traces`).

    ``model_overrides`` update :data:`DEFAULT_MODEL_CONFIG` (see :func:`build_model`); ``None``
    means :data:`WARM_START_MODEL_OVERRIDES` when warm-starting and nothing otherwise.

    Skips work when ``assets.json`` records the same request (version, seed, sizes, model
    overrides, SFT settings) and the files exist.  The SFT is deterministic for a given machine
    and thread count, but float results may differ across CPUs.
    """
    if sft_steps < 0:
        raise ValueError(f"sft_steps must be >= 0, got {sft_steps}")
    output = Path(output)
    paths = _paths(output)
    if model_overrides is None:
        model_overrides = dict(WARM_START_MODEL_OVERRIDES) if sft_steps else {}
    sft = (
        {
            "steps": sft_steps,
            "lr": sft_lr,
            "batch_size": sft_batch_size,
            "redundant_max": sft_redundant_max,
            "problems": sft_steps * sft_batch_size,
            # Only recorded when used, so that existing manifests stay valid.
            **({"redundant_per_gap": sft_redundant_per_gap} if sft_redundant_per_gap else {}),
        }
        if sft_steps
        else {"steps": 0}
    )
    key = _manifest_key(seed, train_size, val_size, vocab_size, model_overrides, sft)
    if (min_steps, max_steps) != (1, 6):
        key["steps"] = [min_steps, max_steps]
    if not force and _is_up_to_date(paths, key):
        return paths

    train = make_problems(train_size, seed, min_steps, max_steps, split="train")
    test = make_problems(
        val_size, seed, min_steps, max_steps, split="test", exclude=[r["prompt"][0]["content"] for r in train]
    )
    write_dataset(train, paths["train"])
    write_dataset(test, paths["test"])

    tokenizer = build_tokenizer(tokenizer_corpus(seed), vocab_size=vocab_size)
    model = build_model(tokenizer, seed=seed, **model_overrides)
    sft_report: dict[str, Any] = {}
    if sft_steps:
        sft_report = _warm_start(model, tokenizer, seed, sft, train, test, (min_steps, max_steps))
    paths["model"].mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(paths["model"])
    model.save_pretrained(paths["model"])

    manifest = dict(key)
    manifest.update(
        vocab_size=len(tokenizer),
        num_parameters=sum(p.numel() for p in model.parameters()),
        files={k: str(v.relative_to(output)) for k, v in paths.items() if k not in ("root", "manifest")},
    )
    if sft_report:
        manifest["sft_result"] = sft_report
    # Written last so that an interrupted build is never mistaken for a complete one.
    paths["manifest"].write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return paths


def _warm_start(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    sft: dict[str, Any],
    train: Sequence[dict],
    test: Sequence[dict],
    steps_range: tuple[int, int] = (1, 6),
) -> dict[str, Any]:
    """Run the SFT described by ``sft`` and return what the manifest records about it."""
    seen = [r["prompt"][0]["content"] for r in (*train, *test)]
    problems = make_problems(sft["problems"], seed, *steps_range, split="sft", exclude=seen)
    stats = warm_start(
        model,
        tokenizer,
        problems,
        steps=sft["steps"],
        lr=sft["lr"],
        batch_size=sft["batch_size"],
        seed=seed,
        redundant_max=sft["redundant_max"],
        redundant_per_gap=sft.get("redundant_per_gap", 0),
        log_every=100,
    )
    # Greedy on the (held-out) test split: a cheap, deterministic sanity figure for the manifest.
    check = evaluate_greedy(model, tokenizer, test, SFT_EVAL_MAX_NEW_TOKENS) if test else None
    # Wall-clock seconds are left out on purpose: the manifest must be byte-identical on a rebuild.
    return {
        "initial_loss": round(stats["initial_loss"], 4),
        "final_loss": round(stats["final_loss"], 4),
        "test_greedy_accuracy": None if check is None else round(check["accuracy"], 4),
        "test_greedy_mean_tokens": None if check is None else round(check["mean_tokens"], 2),
    }


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (its defaults match :func:`build_all`'s)."""
    parser = argparse.ArgumentParser(description="Build offline L2T assets (tiny model + arithmetic data).")
    parser.add_argument("--output", required=True, help="directory to write model/, data/, assets.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument(
        "--sft-steps",
        type=int,
        default=DEFAULT_SFT_STEPS,
        help="warm-start SFT steps (~60-90 s on 2 CPU cores at the default); 0 keeps the random model",
    )
    parser.add_argument(
        "--sft-redundant-max",
        type=int,
        default=DEFAULT_SFT_REDUNDANT_MAX,
        help="max redundant episodes ('Check: ...') inserted per SFT trace",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if assets.json matches")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress (SFT losses) goes to stderr; stdout carries only the JSON of paths.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    paths = build_all(
        args.output,
        seed=args.seed,
        train_size=args.train_size,
        val_size=args.val_size,
        vocab_size=args.vocab_size,
        force=args.force,
        sft_steps=args.sft_steps,
        sft_redundant_max=args.sft_redundant_max,
    )
    json.dump({k: str(v) for k, v in paths.items()}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
