"""Tests of the byte-level BPE tokenizer trainer on a few paragraphs written here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from dgemma.recipes.bpe import SPECIAL_TOKENS, tokens_per_byte, train_tokenizer

PARAGRAPHS = [
    "It was a bright cold morning in April, and the clocks in the old town were striking the "
    "hour. The miller's daughter walked down to the river with a basket of bread.",
    "And the evening and the morning were the third day. And the waters were gathered together "
    "unto one place, and the dry land appeared.",
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the "
    "clouds that lour'd upon our house in the deep bosom of the ocean buried.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
    "seemed to unite some of the best blessings of existence.\r\n",
]
VOCAB = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(PARAGRAPHS * 3, VOCAB, tmp_path_factory.mktemp("tok"))


def test_special_token_ids(trained: Path) -> None:
    tok = Tokenizer.from_file(str(trained))
    assert [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert SPECIAL_TOKENS == ("<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>",
                              "<|think|>", "<|channel>", "<channel|>", "<mask>")
    assert tok.get_vocab_size() == VOCAB
    ids = tok.encode("<|turn>user\nhi<turn|><|think|><|channel>x<channel|><eos>").ids
    assert [i for i in ids if i < len(SPECIAL_TOKENS)] == [4, 5, 6, 7, 8, 1]


def test_no_bos_inserted_and_config(trained: Path) -> None:
    tok = Tokenizer.from_file(str(trained))
    assert tok.post_processor is None and tok.normalizer is None
    assert tok.encode("the river").ids[0] != SPECIAL_TOKENS.index("<bos>")
    config = json.loads((trained.parent / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")} == {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    assert config["add_bos_token"] is True and config["model_max_length"] > 0


def random_text(rng: random.Random, n: int) -> str:
    # Any code point except surrogates, which UTF-8 cannot carry; weighted towards ASCII.
    def char() -> str:
        if rng.random() < 0.5:
            return chr(rng.randrange(0, 128))
        c = rng.randrange(128, 0x110000)
        return chr(c) if not 0xD800 <= c < 0xE000 else "?"
    return "".join(char() for _ in range(n))


@pytest.mark.parametrize("text", [
    "", " leading and trailing spaces  ", "CRLF\r\nline\rbreaks\n\n\ttab",
    "\ufeffBOM and Ctrl-Z \x1a and NUL \x00", "naïve café — “quotes” £5",
    "中文字符 日本語 한국어 العربية עברית", "emoji 🌍👩‍👩‍👧 flags 🇬🇧 e\u0301 combining",
])
def test_round_trip_fixed(trained: Path, text: str) -> None:
    tok = Tokenizer.from_file(str(trained))
    assert tok.decode(tok.encode(text).ids) == text


def test_round_trip_random_unicode(trained: Path) -> None:
    tok = Tokenizer.from_file(str(trained))
    rng = random.Random(1234)
    texts = [random_text(rng, rng.randrange(1, 200)) for _ in range(100)]
    for text, enc in zip(texts, tok.encode_batch(texts), strict=True):
        assert tok.decode(enc.ids) == text
        assert SPECIAL_TOKENS.index("<unk>") not in enc.ids


def test_deterministic(trained: Path, tmp_path: Path) -> None:
    again = train_tokenizer(PARAGRAPHS * 3, VOCAB, tmp_path)
    assert again.read_bytes() == trained.read_bytes()


def test_compresses_and_rejects_tiny_vocab(trained: Path, tmp_path: Path) -> None:
    assert tokens_per_byte(Tokenizer.from_file(str(trained)), PARAGRAPHS) < 0.9
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_tokenizer(PARAGRAPHS, 100, tmp_path)
