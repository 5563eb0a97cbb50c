"""IncrementalDetokenizer and StopStringChecker, on tokenizers trained in the test."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmbatch.runtime.detokenizer import IncrementalDetokenizer, StopMatch, StopStringChecker

CORPUS = [
    "héllo wörld 日本語 🙂",
    "hello world, the quick brown fox jumps over the lazy dog.",
    "naïve café résumé — Größe, Übermaß; 東京 大阪 🙂🙃 ok",
    "def f(x):\n    return x * 2  # tabs\tand spaces",
]
TEXTS = CORPUS + ["日本 wörld héllo 🙃 fox. 語", "zzz ü 🙂 naïve 大"]


def train(pre, dec, vocab_size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = dec
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        if isinstance(pre, pre_tokenizers.ByteLevel) else [])
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


@pytest.fixture(scope="module")
def byte_bpe():
    return train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


@pytest.fixture(scope="module")
def metaspace_bpe():
    # SentencePiece-style: the decoder strips the leading space of a sequence, so a window
    # without context would lose spaces.
    return train(pre_tokenizers.Metaspace(), decoders.Metaspace(), vocab_size=200)


def incremental(tok, ids, chunks, **kw):
    detok = IncrementalDetokenizer(tok, **kw)
    deltas, i = [], 0
    for n in chunks:
        deltas.append(detok.append(ids[i:i + n]))
        i += n
    assert i == len(ids)
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.output_text
    return detok


def test_byte_level_splits_multibyte_characters(byte_bpe):
    # The premise of the hold-back tests: some token alone is an incomplete character.
    ids = byte_bpe.encode("日本語 🙂").ids
    assert any("\ufffd" in byte_bpe.decode([t]) for t in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_equals_full_decode(byte_bpe, text):
    ids = byte_bpe.encode(text).ids
    detok = IncrementalDetokenizer(byte_bpe)
    for t in ids:
        detok.append([t])
        # Never a replacement char, always a prefix of the final text.
        assert "\ufffd" not in detok.output_text
        assert text.startswith(detok.output_text)
    assert detok.output_text == byte_bpe.decode(ids) == text
    assert detok.flush() == ""


def test_random_chunks_equal_full_decode(byte_bpe, metaspace_bpe):
    rng = random.Random(0)
    for tok in (byte_bpe, metaspace_bpe):
        for text in TEXTS:
            ids = tok.encode(text).ids
            chunks = []
            while sum(chunks) < len(ids):
                chunks.append(min(rng.randint(0, 4), len(ids) - sum(chunks)))
            assert incremental(tok, ids, chunks).output_text == tok.decode(ids)


def test_hold_back_until_character_completes(byte_bpe):
    ids = byte_bpe.encode("🙂").ids
    assert len(ids) > 1                                     # the emoji is split in bytes
    detok = IncrementalDetokenizer(byte_bpe)
    assert [detok.append([t]) for t in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_flush_emits_cut_character_like_decode(byte_bpe):
    ids = byte_bpe.encode("ok 日本").ids
    cut = ids[:-1]                                          # the last character is incomplete
    assert byte_bpe.decode(cut).endswith("\ufffd")
    detok = incremental(byte_bpe, cut, [1] * len(cut))
    assert detok.output_text == byte_bpe.decode(cut)


def test_special_tokens(byte_bpe):
    eos = byte_bpe.token_to_id("</s>")
    ids = byte_bpe.encode("héllo").ids + [eos] + byte_bpe.encode(" wörld").ids + [eos]
    skipped = incremental(byte_bpe, ids, [1] * len(ids))
    assert skipped.output_text == byte_bpe.decode(ids) == "héllo wörld"
    kept = incremental(byte_bpe, ids, [1] * len(ids), skip_special_tokens=False)
    assert kept.output_text == byte_bpe.decode(ids, skip_special_tokens=False)
    assert kept.output_text == "héllo</s> wörld</s>"


def test_transformers_tokenizer(byte_bpe):
    hf = PreTrainedTokenizerFast(tokenizer_object=byte_bpe, eos_token="</s>")
    text = "hello world . naïve 東京 🙃 ,"
    ids = hf.encode(text, add_special_tokens=False)
    detok = incremental(hf, ids, [1] * len(ids))
    assert detok.output_text == hf.decode(ids, clean_up_tokenization_spaces=False) == text


def test_decode_windows_stay_short(byte_bpe):
    # O(new tokens): each decode call sees a bounded window, not the whole output.
    seen = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
            seen.append(len(ids))
            return byte_bpe.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = byte_bpe.encode(" ".join(TEXTS * 10)).ids
    assert len(ids) > 400
    detok = incremental(Spy(), ids, [1] * len(ids))
    assert detok.output_text == byte_bpe.decode(ids)
    assert max(seen) <= 10


def test_bad_inputs(byte_bpe):
    with pytest.raises(TypeError, match="decode"):
        IncrementalDetokenizer(object())
    with pytest.raises(ValueError, match="token ids must be >= 0"):
        IncrementalDetokenizer(byte_bpe).append([3, -1])


# -- stop strings ------------------------------------------------------------------------
def test_stop_string_truncation_and_earliest_match():
    checker = StopStringChecker(["END", "\n\n", "stop here"])
    assert checker.check("abc", 3) is None
    assert checker.check("abc\n\nxyz END", 12) == StopMatch("\n\n", 3)
    # The stop string spans the old text and the new tail.
    assert checker.check("hello EN" + "D more", 6) == StopMatch("END", 6)
    # Same start: the longer stop string is reported.
    assert StopStringChecker(["ab", "abc"]).check("xxabc", 3) == StopMatch("abc", 2)


def test_stop_checker_looks_only_at_the_tail():
    checker = StopStringChecker(["END"])
    text = "END" + "x" * 50 + "yy"
    # Old text (already checked) is not searched again: only the last 2 + 2 chars are.
    assert checker.check(text, 2) is None
    assert checker.check(text, len(text)) == StopMatch("END", 0)


def test_stop_streaming_matches_whole_text_search(byte_bpe):
    stops = ["wörld", "🙂", "fox."]
    for text in TEXTS:
        ids = byte_bpe.encode(text).ids
        detok, checker, found = IncrementalDetokenizer(byte_bpe), StopStringChecker(stops), None
        for t in ids:
            delta = detok.append([t])
            found = checker.check(detok.output_text, len(delta))
            if found:
                break
        positions = [(text.find(s), s) for s in stops if s in text]
        if not positions:
            assert found is None
        else:
            pos, stop = min(positions)
            assert found == StopMatch(stop, pos)
            assert detok.output_text[:found.truncate_at] == text[:pos]


def test_stop_checker_bad_inputs():
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStringChecker(["ok", ""])
    with pytest.raises(ValueError, match="num_new_chars must be in"):
        StopStringChecker(["a"]).check("abc", 4)
    assert StopStringChecker([]).check("anything", 8) is None
