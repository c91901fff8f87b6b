"""`--decode autoregressive` and `--decode speculative`: generate and chat token by token with the encoder (drafted
by diffusion for speculative), with the same logits processors, and refuse the options only a canvas has."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

import dgemma
from dgemma.cli import main
from dgemma.generation import autoregressive_steps
from dgemma.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(text_model_dir):
    return dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir)


def greedy(model, ids: list[int], count: int, **kwargs) -> list[int]:
    processors = model.generation_config.updated(**kwargs) if kwargs else None
    return list(autoregressive_steps(model, torch.tensor([ids]), count, model.generation_config.eos_token_ids, 0.0,
                                     processors=processors))


def test_greedy_autoregressive_generation_through_the_command(text_model_dir, model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    prompt = "It is a truth"
    expected = greedy(model, tokenizer.encode(prompt), 8)
    eos = model.generation_config.eos_token_ids
    expected = expected[:-1] if expected and expected[-1] in eos else expected
    assert main(["generate", "--model", str(text_model_dir), prompt, "--decode", "autoregressive",
                 "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == prompt + tokenizer.decode(expected)


def test_logits_processors_apply_to_autoregressive_decoding(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer.encode("It is a truth")
    first = greedy(model, ids, 1)[0]
    assert greedy(model, ids, 1, logit_bias={first: -100.0})[0] != first  # banned
    other = (first + 7) % model.config.vocab_size
    assert greedy(model, ids, 1, logit_bias={other: 100.0})[0] == other  # forced
    # top_k 1 leaves one token: sampling at any temperature is the greedy choice
    sampled = list(autoregressive_steps(model, torch.tensor([ids]), 6, None, 1.5, torch.Generator().manual_seed(3),
                                        processors=model.generation_config.updated(top_k=1)))
    assert sampled == greedy(model, ids, 6, top_k=1)[:len(sampled)]
    # a repeated token is penalised: with a large presence penalty no token repeats in the first steps
    tokens = greedy(model, ids, 6, presence_penalty=50.0)
    assert len(set(tokens)) == len(tokens)


def test_speculative_decoding_through_the_command_writes_the_autoregressive_sample(text_model_dir, capsys):
    command = ["generate", "--model", str(text_model_dir), "It is a truth", "--max-new-tokens", "12", "--seed", "3",
               "--temperature", "0.9", "--stats"]
    assert main([*command, "--decode", "autoregressive"]) == 0
    autoregressive = capsys.readouterr()
    assert main([*command, "--decode", "speculative", "--steps", "2"]) == 0
    speculative = capsys.readouterr()
    assert speculative.out == autoregressive.out
    stats = json.loads(speculative.err.strip().splitlines()[-1])
    assert stats["decoder_passes"] <= 2 * (stats["encoder_passes"] - 1) and stats["tokens_per_forward"] > 0


def test_chat_answers_alike_by_speculative_and_autoregressive_decoding(text_model_dir, capsys, monkeypatch):
    answers = []
    for decode in ("autoregressive", "speculative"):
        lines = iter(["Good morning", ""])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        assert main(["chat", "--model", str(text_model_dir), "--seed", "1", "--max-new-tokens", "10",
                     "--temperature", "0.8", "--decode", decode]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and "model> " in answers[0]


def test_diffusion_only_options_are_refused_with_autoregressive_decoding(text_model_dir, capsys):
    for flags in (["--steps", "4"], ["--show-denoising"], ["--json-object"], ["--sampling", "reference"]):
        assert main(["generate", "--model", str(text_model_dir), "x", "--decode", "autoregressive", *flags]) == 2
        assert "--decode autoregressive has no use for" in capsys.readouterr().err
    for flags in (["--show-denoising"], ["--infill"], ["--regex", "a+"], ["--sampling", "reference"]):
        assert main(["generate", "--model", str(text_model_dir), "x", "--decode", "speculative", *flags]) == 2
        assert "--decode speculative has no use for" in capsys.readouterr().err


def test_the_server_decodes_autoregressively_on_request(text_model_dir, model_and_tokenizer):
    """`decode: "autoregressive"` (an extension): the same tokens as the library, whole or streamed, beside
    diffusion requests and beside each other (sharing encoder forwards); the options only a canvas has are a 400
    naming them."""
    import httpx
    from test_serving import RunningServer

    model, tokenizer = model_and_tokenizer
    server = RunningServer(text_model_dir, max_sequences=3, max_tokens=16)
    try:
        client = server.client()
        prompt = "It is a truth"
        ids = tokenizer.encode(prompt)
        expected = greedy(model, ids, 12)
        eos = model.generation_config.eos_token_ids
        expected = expected[:-1] if expected and expected[-1] in eos else expected
        kwargs = dict(model="dgemma", prompt=prompt, max_tokens=12, temperature=0,
                      extra_body={"decode": "autoregressive"})
        whole = client.completions.create(**kwargs)
        assert whole.choices[0].text == tokenizer.decode(expected)
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
        assert streamed == whole.choices[0].text

        async def beside_diffusion():
            import openai
            async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            diffusion = async_client.completions.create(model="dgemma", prompt="Once", max_tokens=16, seed=1)
            return await asyncio.gather(async_client.completions.create(**kwargs), diffusion)

        together, _ = asyncio.run(beside_diffusion())
        assert together.choices[0].text == whole.choices[0].text

        prompts = ["It is a truth", "Once", "However little known the feelings"]

        async def side_by_side():
            import openai
            async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            return await asyncio.gather(*[async_client.completions.create(**dict(kwargs, prompt=p)) for p in prompts])

        for text, out in zip(prompts, asyncio.run(side_by_side())):
            alone = greedy(model, tokenizer.encode(text), 12)
            alone = alone[:-1] if alone and alone[-1] in eos else alone
            assert out.choices[0].text == tokenizer.decode(alone)
        for field, value in (("max_denoising_steps", 3), ("logprobs", 1), ("infill", True)):
            response = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "decode": "autoregressive",
                                                                        field: value})
            assert response.status_code == 400 and response.json()["error"]["param"] == field
    finally:
        server.stop()
