"""The OpenAI API as clients call it (issue 15), through the official `openai` client and raw HTTP where the client
hides what is tested: the sampling controls on a canvas, logprobs, the fields that change nothing, the Responses
API, and the error codes and fields clients parse."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

import dgemma
from dgemma.tokenizer import Tokenizer
from test_serving import RunningServer

CHAT = [{"role": "user", "content": "Tell a story."}]


@pytest.fixture(scope="module")
def server(text_model_dir):
    running = RunningServer(text_model_dir, max_sequences=4, max_queue=64, max_prompt_tokens=256, max_tokens=64)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def library(text_model_dir):
    """The same model and tokenizer in this process: a seeded request equals `model.generate` with its seed."""
    return dgemma.load(text_model_dir), Tokenizer.from_directory(text_model_dir)


def generated(library, ids: list[int], seed: int, **overrides):
    """New token ids (up to EOS, excluded) and the output of `model.generate` as the server runs a request."""
    model, _ = library
    out = model.generate(torch.tensor([ids]), generator=torch.Generator().manual_seed(seed), **overrides)
    new = out.sequences[0, len(ids):].tolist()
    end = next((i for i, t in enumerate(new) if t == 1), len(new))
    return new[:end], out


# ---- sampling controls ---------------------------------------------------------------------------------------------

def test_fields_clients_send_as_a_matter_of_course_are_accepted(server):
    """temperature 0, top_p 1, store, metadata, user, service_tier and friends: 200, not 400; responses carry a
    system_fingerprint naming the package version and the model."""
    client = server.client()
    chat = client.chat.completions.create(
        model="dgemma", messages=CHAT, max_tokens=8, temperature=0, top_p=1, store=True, metadata={"app": "x"},
        user="someone", service_tier="auto", prompt_cache_key="k", safety_identifier="s", parallel_tool_calls=True,
        tool_choice="none", tools=[], n=1, stream_options=None)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.system_fingerprint.startswith(f"dgemma-{dgemma.__version__}-")
    completion = client.completions.create(model="dgemma", prompt="It is", max_tokens=4, seed=0, top_p=1.0)
    assert completion.system_fingerprint == chat.system_fingerprint
    streamed = list(client.chat.completions.create(model="dgemma", messages=CHAT, max_tokens=4, stream=True,
                                                   stream_options={"include_usage": True,
                                                                   "include_obfuscation": False}))
    assert {c.system_fingerprint for c in streamed} == {chat.system_fingerprint}


def test_temperature_zero_is_the_argmax_and_needs_no_seed(server, library):
    client = server.client()
    answers = [client.chat.completions.create(model="dgemma", messages=CHAT, max_tokens=16, temperature=0)
               for _ in range(2)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    model, tokenizer = library
    ids = tokenizer.encode_chat(CHAT)
    new, _ = generated(library, ids, 0, max_new_tokens=16, do_sample=False)  # seed 0 stands in for none
    assert tokenizer.decode(new) == answers[0].choices[0].message.content


def test_sampling_controls_are_the_library_s(server, library):
    """top_p, top_k, penalties and logit_bias through the client give the tokens `model.generate` gives with the
    same settings and seed (and other tokens than without them)."""
    client = server.client()
    _, tokenizer = library
    controls = dict(top_p=0.8, frequency_penalty=1.2, presence_penalty=0.5, logit_bias={"7": 3.0, "11": -100})
    texts = [client.completions.create(model="dgemma", prompt="It is a truth", max_tokens=32, seed=seed,
                                       extra_body={"top_k": 12}, **controls).choices[0].text for seed in (3, 4)]
    ids = tokenizer.encode("It is a truth")
    for seed, text in zip((3, 4), texts):
        new, _ = generated(library, ids, seed, max_new_tokens=32, top_p=0.8, top_k=12, frequency_penalty=1.2,
                           presence_penalty=0.5, logit_bias={7: 3.0, 11: -100.0})
        assert tokenizer.decode(new) == text and 11 not in new
    plain = client.completions.create(model="dgemma", prompt="It is a truth", max_tokens=32, seed=3).choices[0].text
    assert plain != texts[0]


def test_logit_bias_forces_and_bans_tokens(server, library):
    _, tokenizer = library
    client = server.client()
    word = tokenizer.encode(" the", add_special_tokens=False)
    assert len(word) == 1
    forced = client.completions.create(model="dgemma", prompt="It is", max_tokens=12, seed=1,
                                       logit_bias={str(word[0]): 100})
    assert forced.choices[0].text == " the" * 12
    first = client.completions.create(model="dgemma", prompt="It is", max_tokens=24, seed=1, logprobs=0)
    seen = set(first.choices[0].logprobs.tokens)
    pieces = server.app.state.service.pieces  # each token id's text as logprobs spell it
    banned_ids = {t for t in range(tokenizer.vocab_size) if pieces(t)[0] in seen}
    again = client.completions.create(model="dgemma", prompt="It is", max_tokens=24, seed=1, logprobs=0,
                                      logit_bias={str(t): -100 for t in banned_ids})
    assert not seen & set(again.choices[0].logprobs.tokens)


# ---- logprobs ------------------------------------------------------------------------------------------------------

def test_completion_logprobs(server, library):
    """`logprobs: 2` on a completion: one entry per generated token, each the committed (argmax) token's
    log-probability, which is the most likely of its two alternatives; the values are the library's."""
    client = server.client()
    out = client.completions.create(model="dgemma", prompt="It is a truth", max_tokens=20, seed=5, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert len(logprobs.tokens) == out.usage.completion_tokens
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 2 and value >= max(top.values()) - 1e-4
    _, tokenizer = library
    new, output = generated(library, tokenizer.encode("It is a truth"), 5, max_new_tokens=20, logprobs=True,
                            top_logprobs=2)
    assert logprobs.token_logprobs == pytest.approx(output.logprobs[0, :len(new)].tolist(), abs=1e-6)
    chunks = list(client.completions.create(model="dgemma", prompt="It is a truth", max_tokens=20, seed=5,
                                            logprobs=2, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == logprobs.tokens
    assert [o for p in parts for o in p.text_offset] == logprobs.text_offset


def test_chat_logprobs_whole_and_streamed(server):
    """`logprobs: true, top_logprobs: 3`: entries whose bytes make up the content, three alternatives each; the
    streamed entries, arriving with their canvases, are the same."""
    client = server.client()
    kwargs = dict(model="dgemma", messages=CHAT, max_tokens=24, seed=6, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kwargs).choices[0]
    entries = whole.logprobs.content
    assert entries and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == whole.message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    assert chunks[0].choices[0].logprobs is None  # the role chunk


def test_logprobs_are_refused_where_openai_refuses_them(server):
    for body in ({"messages": CHAT, "top_logprobs": 2}, {"messages": CHAT, "logprobs": True, "top_logprobs": 21}):
        response = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


# ---- errors and fields clients parse -------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "audio": {"voice": "x"}}, "audio"),
    ("/v1/chat/completions", {"messages": CHAT, "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "frequency_penalty": 3}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "t_min": 0.9, "t_max": 0.5}, "t_max"),
])
def test_every_400_names_its_field(server, path, body, param):
    response = httpx.post(server.url + path, json=body)
    assert response.status_code == 400
    err = response.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_a_prompt_past_the_context_is_context_length_exceeded(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="dgemma", max_tokens=4,
                                       messages=[{"role": "user", "content": "word " * 400}])
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    response = httpx.post(server.url + "/v1/completions", json={"prompt": list(range(3, 300))})
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_the_first_chat_chunk_has_the_role_and_empty_content(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"messages": CHAT, "max_tokens": 4, "stream": True, "seed": 0}) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    delta = json.loads(first[6:])["choices"][0]["delta"]
    assert delta == {"role": "assistant", "content": ""}


def test_n_choices_count_the_prompt_once(server):
    client = server.client()
    one = client.completions.create(model="dgemma", prompt="It is a truth", max_tokens=4, seed=1)
    two = client.completions.create(model="dgemma", prompt="It is a truth", max_tokens=4, seed=1, n=2)
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == sum(
        client.completions.create(model="dgemma", prompt="It is a truth", max_tokens=4, seed=s).usage.completion_tokens
        for s in (1, 2))


# ---- the Responses API ---------------------------------------------------------------------------------------------

def test_responses_create_is_a_chat(server):
    """`client.responses.create` with text input or role items and instructions answers what the chat route
    answers for the same messages and seed."""
    client = server.client()
    response = client.responses.create(model="dgemma", input="Tell a story.", instructions="Be terse.",
                                       max_output_tokens=24, temperature=0.9, top_p=0.95, extra_body={"seed": 8})
    chat = client.chat.completions.create(model="dgemma", max_tokens=24, temperature=0.9, top_p=0.95, seed=8,
                                          messages=[{"role": "system", "content": "Be terse."}] + CHAT)
    assert response.object == "response" and response.output_text == chat.choices[0].message.content
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    items = client.responses.create(model="dgemma", max_output_tokens=8, extra_body={"seed": 8}, input=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "output_text", "text": "Hello",
                                                                              "annotations": []}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "More"}]}])
    assert items.output[0].type == "message" and items.output[0].role == "assistant"


def test_responses_stream_events(server):
    """`stream: true`: OpenAI's event sequence, deltas that add up to the whole response, consecutive sequence
    numbers; with `stream_options.include_drafts` also a `dgemma.draft` event per denoising step."""
    client = server.client()
    kwargs = dict(model="dgemma", input="Tell a story.", max_output_tokens=24, extra_body={"seed": 9})
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    drafted = list(client.responses.create(stream=True, model="dgemma", input="Hi", max_output_tokens=8,
                                           extra_body={"seed": 9, "stream_options": {"include_drafts": True},
                                                       "max_denoising_steps": 3, "stability_threshold": None}))
    drafts = [e for e in drafted if e.type == "dgemma.draft"]
    assert len(drafts) == 3 and drafted[-1].type in ("response.completed", "response.incomplete")


def test_responses_structured_output_and_logprobs(server):
    import jsonschema
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}}, "required": ["colour"],
              "additionalProperties": False}
    client = server.client()
    finished = 0
    for seed in range(3):
        out = client.responses.create(model="dgemma", input="A colour?", max_output_tokens=32,
                                      extra_body={"seed": seed}, text={"format": {
                                          "type": "json_schema", "name": "c", "schema": schema, "strict": True}})
        if out.status == "completed":
            finished += 1
            jsonschema.validate(json.loads(out.output_text), schema)
    assert finished >= 1
    out = client.responses.create(model="dgemma", input="Hi", max_output_tokens=8, top_logprobs=2,
                                  include=["message.output_text.logprobs"], extra_body={"seed": 1})
    logprobs = out.output[0].content[0].logprobs
    assert logprobs and all(len(e.top_logprobs) == 2 for e in logprobs)


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": "x", "max_output_tokens": 1000}, "max_output_tokens"),
    ({"input": "word " * 400}, "input"),
])
def test_responses_refuse_what_they_cannot_honour_by_name(server, body, param):
    response = httpx.post(server.url + "/v1/responses", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("body, param", [
    ('{"prompt": ["ok", "a\\udfffb"]}', "prompt"),  # found by the body-wide check, named by its place
    ('{"prompt": "x", "entropy_bound": NaN}', "entropy_bound"),
    ('{"prompt": "x", "max_tokens": 4, "n": 99}', "n"),
])
def test_malformed_fields_are_named_in_param(server, body, param):
    response = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_a_thought_becomes_a_reasoning_item(text_model_dir):
    """Gemma 4 thinking through the Responses API: the thought channel streams as a reasoning item (its own
    events, before the message), and the whole response holds it as output[0] with the answer in output[1]."""
    import asyncio

    from dgemma.serving.protocol import ResponsesRequest
    from dgemma.serving.responses import ResponsesShaper, stream_response
    from dgemma.serving.scheduler import Commit, Finish
    from dgemma.serving.service import ChoiceText

    tokenizer = Tokenizer.from_directory(text_model_dir)
    ids = tokenizer.encode("<|channel>thought\nweigh it<channel|>The answer.", add_special_tokens=False)

    class Events:  # what a Generation hands the shaper: the answer in two canvases, then the end
        async def events(self):
            yield 0, Commit(0, ids[:4], 3)
            yield 0, Commit(1, ids[4:], 3)
            yield 0, Finish("stop", ids, 6)

    async def run():
        shaper = ResponsesShaper(ResponsesRequest(input="Why?"), "dgemma", tokenizer, [1], prompt_tokens=5)
        text = ChoiceText(tokenizer, [], split_thinking=True)
        return [json.loads(chunk.split("data: ", 1)[1]) async for chunk in stream_response(shaper, Events(), text,
                                                                                             drafts=False)]

    events = asyncio.run(run())
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    answer = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert (reasoning, answer) == ("weigh it", "The answer.")
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed" and [o["type"] for o in final["output"]] == ["reasoning",
                                                                                                     "message"]
    assert final["output"][0]["content"][0]["text"] == "weigh it"
    assert final["output"][1]["content"][0]["text"] == "The answer."
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == ids.index(
        tokenizer.token_id("<channel|>")) + 1
