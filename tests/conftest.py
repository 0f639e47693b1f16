"""Shared test fixtures.

``tiny_tokenizer``: a real byte-level BPE tokenizer trained offline in about a second. Its
pre-tokenizer does not split on whitespace or punctuation, so BPE learns tokens that cross an
episode delimiter (".\\n\\n", "s.\\n\\nTh") and tokens that hold only part of a multi-byte UTF-8
character ("€", "中", "🙂" are split over tokens): exactly the cases where re-tokenizing decoded
text would give different ids than the ones sampled.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TOKENIZER_CORPUS = [
    "<think>First, add the numbers.\n\nThen multiply by two.\n\nThe answer is 42.</think>"
    "The answer is \\boxed{42}.",
    "Step one: read the question.\n\nStep two: solve it.\n\nSo the result is 7.\n\n</think>\\boxed{7}",
    "Café au lait costs 3€.\n\nZürich is nice.\n\n中文的句子。\n\nEmoji 🙂 here.\n\nDone.",
    "<think>Let me think.\n\nHmm, wait.\n\nOK.</think><think>Again.\n\nYes.</think>Final.",
]
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<think>", "</think>"]


def build_tiny_tokenizer(vocab_size: int = 420):
    """Train the tiny byte-level BPE tokenizer and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_TOKENIZER_CORPUS * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_corpus() -> list[str]:
    return list(TINY_TOKENIZER_CORPUS)


@pytest.fixture(scope="session")
def e2e_assets(tmp_path_factory) -> Path:
    """Warm-started tiny model + arithmetic data for the real-trainer tests, built once per session
    (about 85 s on two cores). ``L2T_TEST_ASSETS=DIR`` keeps them in DIR across sessions: the build
    is skipped while DIR's manifest matches."""
    import os

    from trainer_run import build_e2e_assets

    folder = os.environ.get("L2T_TEST_ASSETS")
    return build_e2e_assets(Path(folder) if folder else tmp_path_factory.mktemp("e2e_assets"))
