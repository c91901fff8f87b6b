"""Train the bundled model's byte-level BPE tokenizer with the Hugging Face ``tokenizers`` library.

Design choices:

* Byte-level BPE (GPT-2 style): the ByteLevel pre-tokenizer maps every byte to a printable symbol
  and splits with its built-in regex, and the ByteLevel decoder maps back, so any Unicode text
  (CRLF, byte-order marks and control characters included) encodes and decodes exactly. All 256
  byte symbols are in the vocabulary whatever the training text, so ``<unk>`` is never produced.
* No normalizer (no lowercasing, no Unicode normalisation) and no prefix space: decoding returns
  the input byte for byte.
* Special tokens take the first ids, in this order: 0 ``<pad>``, 1 ``<eos>``, 2 ``<bos>``,
  3 ``<unk>``, 4 ``<|turn>``, 5 ``<turn|>``, 6 ``<|think|>``, 7 ``<|channel>``, 8 ``<channel|>``,
  9 ``<mask>`` (reserved). The Gemma-4-style chat control tokens are single tokens, never merged
  into or split out of text by training.
* No post-processor: whether a BOS is added is the chat/tokenizer layer's decision;
  ``tokenizer_config.json`` records ``add_bos_token: true`` as that layer's default.
* Deterministic: the trainer's merge choice breaks count ties by the pair itself, and the saved
  JSON lists vocabulary and merges in id order, so the same texts give the same file bytes.

Train on a built corpus (see :mod:`dgemma.recipes.corpus`) with
``python -m dgemma.recipes.bpe CORPUS_DIR OUT_DIR --vocab-size 8192``; it trains on the train
split and prints tokens per byte on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|think|>",
                  "<|channel>", "<channel|>", "<mask>")
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN = SPECIAL_TOKENS[:4]
MASK_TOKEN = SPECIAL_TOKENS[9]
DEFAULT_MODEL_MAX_LENGTH = 2048

# Gemma 4's turn format with this tokenizer's control tokens: <|turn>role\n ... <turn|>\n, the assistant's role
# named "model". A system prompt starting with <|think|> asks for thinking; earlier thoughts are stripped by
# the chat layer before rendering.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{% endif %}"
    "{{ '<|turn>' + role + '\n' + text | trim + '<turn|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path,
                    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Path:
    """Train a byte-level BPE tokenizer of ``vocab_size`` entries (special tokens and the 256
    byte symbols included) on ``texts``; write ``tokenizer.json``, ``tokenizer_config.json`` and
    ``chat_template.jinja`` to ``out_dir`` and return the path of ``tokenizer.json``."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(SPECIAL_TOKENS)} special "
                         f"tokens plus {len(alphabet)} byte symbols")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token!r} got id {tokenizer.token_to_id(token)}, "
                               f"expected {token_id}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "mask_token": MASK_TOKEN,
        "additional_special_tokens": list(SPECIAL_TOKENS[4:9]),
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def tokens_per_byte(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Tokens per UTF-8 byte over ``texts`` (lower is better compression)."""
    texts = list(texts)
    n_tokens = sum(len(enc.ids) for enc in tokenizer.encode_batch(texts, add_special_tokens=False))
    return n_tokens / sum(len(t.encode("utf-8")) for t in texts)


def main(argv: Iterable[str] | None = None) -> None:
    from dgemma.recipes.corpus import load_corpus, split_documents

    parser = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer on a corpus.")
    parser.add_argument("corpus_dir", type=Path, help="output directory of dgemma.recipes.corpus")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH)
    args = parser.parse_args(None if argv is None else list(argv))

    train, heldout = split_documents(load_corpus(args.corpus_dir))
    start = time.perf_counter()
    path = train_tokenizer(train, args.vocab_size, args.out_dir, args.model_max_length)
    seconds = time.perf_counter() - start
    ratio = tokens_per_byte(Tokenizer.from_file(str(path)), heldout)
    print(f"[bpe] wrote {path} (vocab {args.vocab_size}) in {seconds:.1f} s; "
          f"held-out tokens per byte {ratio:.4f}")


if __name__ == "__main__":
    main()
