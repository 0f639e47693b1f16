"""Episode segmentation (docs/method.md §1): token-exact, never re-tokenizing."""

from __future__ import annotations

import functools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2t_verl.episodes import (
    THINK_CLOSE,
    EpisodeConfig,
    cap_episodes,
    char_to_token_ends,
    episode_ids_for,
    merge_short_episodes,
    segment_episodes,
    token_char_ends,
)

HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _token_ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _oracle_char_ends(tok, ids):
    """Slow, independent offsets: decode every prefix. Incomplete trailing characters (decoded as
    U+FFFD) are not credited until a later token completes them."""
    out, best = [], 0
    for i in range(len(ids)):
        best = max(best, len(_decode(tok, ids[: i + 1]).rstrip("\ufffd")))
        out.append(best)
    if ids:
        out[-1] = len(_decode(tok, ids))
    return out


@st.composite
def response_ids(draw, tok, corpus):
    """Random responses: slices of real text with random chunks inserted: random ids (incl.
    partial UTF-8 byte tokens) and ids that matter for segmentation (delimiters, think tags,
    "</think>" spelled out of single-byte tokens, EOS)."""
    spelled_close = tok.convert_tokens_to_ids(list(THINK_CLOSE))
    chunks = st.one_of(
        st.integers(0, len(tok) - 1).map(lambda i: [i]),
        st.sampled_from(
            [
                [tok.convert_tokens_to_ids("</think>")],
                [tok.convert_tokens_to_ids("<think>")],
                [tok.eos_token_id],
                _token_ids(tok, "\n\n"),
                _token_ids(tok, ".\n\n"),
                spelled_close,
            ]
        ),
    )
    real = _token_ids(tok, draw(st.sampled_from(corpus)))
    lo = draw(st.integers(0, len(real)))
    hi = draw(st.integers(lo, len(real)))
    noise = sum(draw(st.lists(chunks, max_size=12)), [])
    where = draw(st.integers(0, hi - lo))
    piece = real[lo:hi]
    return piece[:where] + noise + piece[where:]


def _pieces(ids, ends):
    return [ids[a:b] for a, b in zip([0, *ends], ends, strict=False)]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"mode": "sentences"}, "l2t.episodes.mode"),
        ({"delimiter": ""}, "l2t.episodes.delimiter"),
        ({"delimiter": "(\n"}, "l2t.episodes.delimiter"),
        ({"delimiter": "\n*"}, "l2t.episodes.delimiter"),
        ({"min_episode_tokens": 0}, "l2t.episodes.min_episode_tokens"),
        ({"max_episodes": 0}, "l2t.episodes.max_episodes"),
        ({"max_episodes": True}, "l2t.episodes.max_episodes"),
        ({"max_episodes": 2.5}, "l2t.episodes.max_episodes"),
    ],
)
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        EpisodeConfig(**kwargs).validate()


def test_default_config_is_valid():
    cfg = EpisodeConfig().validate()
    assert (cfg.mode, cfg.delimiter, cfg.min_episode_tokens, cfg.max_episodes) == (
        "delimiter",
        r"\n\n",
        1,
        20,
    )


# --------------------------------------------------------------------------- offsets


def test_tokenizer_has_the_hard_cases(tiny_tokenizer, tiny_tokenizer_corpus):
    """Guard: the fixture really has delimiter-crossing and partial-UTF-8 tokens."""
    tok = tiny_tokenizer
    assert len(_token_ids(tok, ".\n\n")) == 1
    pieces = [_decode(tok, [i]) for i in _token_ids(tok, tiny_tokenizer_corpus[0])]
    assert any("\n\n" in p and not p.endswith("\n\n") for p in pieces)  # straddles a boundary
    pieces = [_decode(tok, [i]) for i in _token_ids(tok, tiny_tokenizer_corpus[2])]
    assert any("\ufffd" in p for p in pieces)  # holds part of a multi-byte character


def test_char_ends_on_real_text(tiny_tokenizer, tiny_tokenizer_corpus):
    for text in tiny_tokenizer_corpus:
        ids = _token_ids(tiny_tokenizer, text)
        decoded, char_ends = token_char_ends(ids, tiny_tokenizer)
        assert decoded == text
        assert char_ends == _oracle_char_ends(tiny_tokenizer, ids)


@HYP
@given(data=st.data())
def test_char_ends_match_prefix_decode(tiny_tokenizer, tiny_tokenizer_corpus, data):
    ids = data.draw(response_ids(tiny_tokenizer, tiny_tokenizer_corpus))
    decoded, char_ends = token_char_ends(ids, tiny_tokenizer)
    assert decoded == _decode(tiny_tokenizer, ids)
    assert char_ends == _oracle_char_ends(tiny_tokenizer, ids)


def test_multibyte_character_goes_to_the_token_that_completes_it(tiny_tokenizer):
    ids = _token_ids(tiny_tokenizer, "costs 3€.\n\n")
    text, char_ends = token_char_ends(ids, tiny_tokenizer)
    euro = text.index("€")
    owner = char_to_token_ends(char_ends, [euro + 1])[0] - 1
    # The token owning "€" is the first one whose prefix decodes to a complete "€".
    assert "€" in _decode(tiny_tokenizer, ids[: owner + 1])
    assert "€" not in _decode(tiny_tokenizer, ids[:owner])


def test_char_to_token_ends():
    char_ends = [0, 2, 2, 5, 9]  # token 0 is an incomplete byte, token 2 adds no character
    assert char_to_token_ends(char_ends, [1, 2, 3, 9, 0]) == [0, 2, 4, 5]


# --------------------------------------------------------------------------- segmentation


def test_delimiter_boundary_after_merged_token_without_retokenizing(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = _token_ids(tok, "<think>Let me think.\n\nHmm, wait.\n\nOK.</think>Final.")
    ends = segment_episodes(ids, tok, EpisodeConfig())
    texts = [_decode(tok, p) for p in _pieces(ids, ends)]
    assert "".join(texts) == "<think>Let me think.\n\nHmm, wait.\n\nOK."
    assert _decode(tok, ids[ends[-1] :]) == "</think>Final."
    dot_nl = _token_ids(tok, ".\n\n")[0]
    second = _pieces(ids, ends)[1]
    assert second[-1] == dot_nl and texts[1].endswith(".\n\n")  # ".\n\n" is one token, kept whole
    # A straddling token ("...\n\nHm") belongs to the episode whose delimiter it ends.
    assert "\n\n" in _decode(tok, [ids[ends[0] - 1]])


def test_think_tags_mode(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "<think>Let me think.\n\nHmm, wait.\n\nOK.</think><think>Again.\n\nYes.</think>Final."
    ids = _token_ids(tok, text)
    ends = segment_episodes(ids, tok, EpisodeConfig(mode="think_tags"))
    assert [_decode(tok, p) for p in _pieces(ids, ends)] == [
        "<think>Let me think.\n\nHmm, wait.\n\nOK.</think>",
        "<think>Again.\n\nYes.</think>",
    ]
    assert _decode(tok, ids[ends[-1] :]) == "Final."


def test_no_boundary_is_one_episode_and_empty_is_zero(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = _token_ids(tok, "Final answer")
    assert segment_episodes(ids, tok, EpisodeConfig()) == [len(ids)]
    assert segment_episodes(ids, tok, EpisodeConfig(mode="think_tags")) == [len(ids)]
    assert segment_episodes([], tok, EpisodeConfig()) == []
    # Nothing before </think>: no reasoning, no episode.
    assert segment_episodes(_token_ids(tok, "</think>Final"), tok, EpisodeConfig()) == []
    # Trailing EOS is not reasoning.
    assert segment_episodes([*ids, tok.eos_token_id], tok, EpisodeConfig()) == [len(ids)]
    assert segment_episodes([tok.eos_token_id], tok, EpisodeConfig()) == []


def test_min_and_max_on_real_text(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "Café au lait costs 3€.\n\nZürich is nice.\n\n中文的句子。\n\nEmoji 🙂 here.\n\nDone."
    ids = _token_ids(tok, text)
    assert len(segment_episodes(ids, tok, EpisodeConfig())) == 5
    capped = segment_episodes(ids, tok, EpisodeConfig(max_episodes=2))
    assert len(capped) == 2 and capped[-1] == len(ids)
    merged = segment_episodes(ids, tok, EpisodeConfig(min_episode_tokens=6))
    assert all(b - a >= 6 for a, b in zip([0, *merged], merged, strict=False))


def test_merge_short_episodes():
    assert merge_short_episodes([], 3) == []
    assert merge_short_episodes([5, 6, 12], 3) == [5, 12]  # short piece joins the next one
    assert merge_short_episodes([5, 10, 11], 3) == [5, 11]  # short last piece joins the previous
    assert merge_short_episodes([1, 2], 3) == [2]  # cannot satisfy: one episode
    assert merge_short_episodes([1, 2, 3], 1) == [1, 2, 3]


def test_cap_episodes_prefers_equal_spacing():
    assert cap_episodes(list(range(1, 101)), 4) == [25, 50, 75, 100]
    assert cap_episodes([1, 2, 3, 48, 52, 99, 100], 2) == [48, 100]
    assert cap_episodes([3, 7], 5) == [3, 7]
    assert cap_episodes([3, 7, 9], 1) == [9]


def test_episode_ids_for():
    assert episode_ids_for(7, [2, 5]) == [0, 0, 1, 1, 1, -1, -1]
    assert episode_ids_for(3, []) == [-1, -1, -1]
    with pytest.raises(ValueError, match="strictly increasing"):
        episode_ids_for(3, [2, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        episode_ids_for(3, [4])


def _delimiter_match_ends(text, cfg):
    span = text.find(THINK_CLOSE)
    span = len(text) if span < 0 else span
    return [m.end() for m in re.finditer(cfg.delimiter, text[:span]) if m.end() > m.start()], span


@HYP
@given(data=st.data(), mode=st.sampled_from(["delimiter", "think_tags"]))
def test_segmentation_properties(tiny_tokenizer, tiny_tokenizer_corpus, data, mode):
    tok = tiny_tokenizer
    ids = data.draw(response_ids(tok, tiny_tokenizer_corpus))
    cfg = EpisodeConfig(
        mode=mode,
        min_episode_tokens=data.draw(st.integers(1, 4)),
        max_episodes=data.draw(st.integers(1, 6)),
    )
    ends = segment_episodes(ids, tok, cfg)

    assert all(1 <= e <= len(ids) for e in ends)
    assert all(a < b for a, b in zip(ends, ends[1:], strict=False))
    assert len(ends) <= cfg.max_episodes
    if len(ends) > 1:
        assert all(b - a >= cfg.min_episode_tokens for a, b in zip([0, *ends], ends, strict=False))
    tail = ids[ends[-1] :] if ends else ids
    assert sum(_pieces(ids, ends), []) + tail == ids
    labels = episode_ids_for(len(ids), ends)
    assert labels.count(-1) == len(tail)

    text, char_ends = token_char_ends(ids, tok)
    starts = [0, *char_ends]  # starts[i]: characters before token i
    for e in ends[:-1]:  # each non-final episode ends on a token that completes a delimiter / tag
        pattern = cfg.delimiter if mode == "delimiter" else re.escape(THINK_CLOSE)
        assert any(starts[e - 1] < m.end() <= starts[e] for m in re.finditer(pattern, text))


@HYP
@given(data=st.data())
def test_every_delimiter_is_a_boundary_when_unconstrained(tiny_tokenizer, tiny_tokenizer_corpus, data):
    """With min 1 and no cap, boundaries are exactly the tokens ending a delimiter match, plus
    the end of the reasoning span; nothing is lost or invented."""
    tok = tiny_tokenizer
    ids = data.draw(response_ids(tok, tiny_tokenizer_corpus))
    cfg = EpisodeConfig(max_episodes=10_000)
    ends = segment_episodes(ids, tok, cfg)
    n = len(ids)
    while n and ids[n - 1] == tok.eos_token_id:
        n -= 1
    text, char_ends = token_char_ends(ids[:n], tok)
    match_ends, span = _delimiter_match_ends(text, cfg)
    if span == 0:
        assert ends == []
        return
    span_tok = char_to_token_ends(char_ends, [span])[0]
    expected = {e for e in char_to_token_ends(char_ends, match_ends) if e < span_tok} | {span_tok}
    assert ends == sorted(expected)
    starts = [0, *char_ends]
    for e in ends[:-1]:
        if any(m == starts[e] for m in match_ends):  # last token stops right at the delimiter
            assert re.search(f"(?:{cfg.delimiter})$", text[: starts[e]])


@functools.cache
def _sentencepiece_style_tokenizer():
    """Metaspace + byte-fallback BPE (Llama/Mistral style): a decode drops the leading space of
    its first token, and characters outside the vocabulary are spelled as <0xNN> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>", "</think>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator(["Hello world. Then more words here.\n\nAnd the end."] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@settings(max_examples=60, deadline=None)
@given(
    text=st.lists(
        st.sampled_from(list("ab c.\n") + ["€", "中", "🙂", "é", "\n\n", " the ", " words", "</think>"]),
        max_size=25,
    ).map("".join)
)
def test_char_ends_with_sentencepiece_style_decoder(text):
    tok = _sentencepiece_style_tokenizer()
    ids = _token_ids(tok, text)
    decoded, char_ends = token_char_ends(ids, tok)
    assert decoded == _decode(tok, ids)
    for i in range(len(ids)):
        prefix = _decode(tok, ids[: i + 1])
        if not prefix.endswith("\ufffd"):  # complete characters only
            assert char_ends[i] == len(prefix)
    ends = segment_episodes(ids, tok, EpisodeConfig(max_episodes=100))
    starts = [0, *char_ends]
    span = decoded.split(THINK_CLOSE)[0]
    for e in ends[:-1]:
        assert any(starts[e - 1] < m.end() <= starts[e] for m in re.finditer("\n\n", span))
