"""Acceptance tests of `afm serve` through the official `openai` client (and raw HTTP where the
client would hide what is being tested: malformed bodies, headers, the SSE framing).

Expected values come from outside the server under test: `afm generate` / `afm chat` for greedy
text and token counts, HF tokenizers and jinja2 for the utility endpoints, and OpenAI's API
contract for shapes, statuses and limits.
"""
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import httpx2
import openai
import pytest

from conftest import BLOCK_SIZE, MODEL_DIR, MODEL_NAME

PROMPTS = ["It is a truth universally acknowledged, that", "Elizabeth", "And it came to pass"]
LONG_PROMPT = (
    "Journal entry, 1811: Tonight the whole family gathered in the drawing-room at Longbourn. Mrs. Bennet "
    "spoke of nothing but the new tenant of Netherfield, and Mr. Bennet, as was his custom, said very little, "
    "though he listened to all of it with a smile. Elizabeth sat by the window with her sister Jane, and"
)
CHAT = [{"role": "system", "content": "You are a quiet narrator."}, {"role": "user", "content": "Tell me of Longbourn."}]


@pytest.fixture(scope="module")
def server(module_server_factory):
    return module_server_factory("--weights", "f32")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def collect_stream(stream, chat=False):
    """Reads an openai stream: {"text": {index: str}, "finish": {index: reason}, "usage": usage or
    None, "chunks": [...]}; checks the per-chunk invariants on the way."""
    text, finish, usage, chunks = {}, {}, None, []
    for chunk in stream:
        chunks.append(chunk)
        assert usage is None, "a chunk came after the usage chunk"
        if not chunk.choices:  # stream_options.include_usage: the last chunk, empty choices
            assert chunk.usage is not None, f"a chunk with no choices and no usage: {chunk}"
            usage = chunk.usage
            continue
        assert chunk.usage is None, f"usage on a chunk with choices: {chunk}"
        for c in chunk.choices:
            assert c.index not in finish, f"choice {c.index} got a chunk after its finish_reason"
            piece = (c.delta.content or "") if chat else c.text
            text[c.index] = text.get(c.index, "") + piece
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return {"text": text, "finish": finish, "usage": usage, "chunks": chunks}


def check_usage(usage, expect_prompt=None, expect_completion=None):
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0, usage
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens is not None, usage
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens, usage
    if expect_prompt is not None:
        assert usage.prompt_tokens == expect_prompt, usage
    if expect_completion is not None:
        assert usage.completion_tokens == expect_completion, usage


def check_error_body(body, status, param=None, type_="invalid_request_error"):
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    e = body["error"]
    assert {"message", "type", "param", "code"} <= set(e), e
    assert isinstance(e["message"], str) and e["message"], e
    assert isinstance(e["type"], str) and e["type"], e
    if type_ is not None:
        assert e["type"] == type_, e
    assert e["code"] is not None, e
    if param is not None:
        assert e["param"] == param, e


def check_raw_error(r, status, param=None, type_="invalid_request_error"):
    assert r.status_code == status, f"expected HTTP {status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    check_error_body(r.json(), status, param, type_)


def expect_api_error(status, call, param=None, type_="invalid_request_error"):
    """The openai client raises APIStatusError with the status; the body has OpenAI's shape."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    e = info.value
    assert e.status_code == status, f"expected {status}, got {e.status_code}: {e.response.text[:500]}"
    check_error_body(e.response.json(), status, param, type_)
    return e


def greedy_completion(client, prompt, max_tokens, **kw):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def sse_events(response):
    """The `data:` payloads of a raw SSE response, in order."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]
        else:
            assert line == "" or line.startswith(":"), f"unexpected SSE line {line!r}"


# ---------------------------------------------------------------------------------------------
# completions and chat
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_matches_afm_generate(client, oracles, hf_tokenizer, prompt):
    n = 24
    expected = oracles.generate(prompt, n)
    assert expected["finished_by"] == "length", f"pick a prompt whose greedy text runs {n} tokens: {expected}"
    r = greedy_completion(client, prompt, n)
    assert r.object == "text_completion" and r.model == MODEL_NAME and r.id
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.text, r
    assert c.text == expected["text"], f"server: {c.text!r}\nafm generate: {expected['text']!r}"
    assert c.finish_reason == "length"
    assert c.logprobs is None
    # The prompt's tokens with the bos token, as HF tokenizers counts them.
    check_usage(r.usage, expect_prompt=len(hf_tokenizer.encode(prompt, add_special_tokens=True).ids),
                expect_completion=n)
    assert r.usage.prompt_tokens == expected["prompt_tokens"]


def test_completion_tokens_match_afm_generate(server, oracles):
    """Token for token: the server's continuation re-tokenized after the prompt is the token
    sequence afm generate produced (same count, and the same text decoded back)."""
    prompt, n = PROMPTS[0], 32
    expected = oracles.generate(prompt, n)
    r = greedy_completion(server.client(), prompt, n, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == expected["generated_tokens"] == r.usage.completion_tokens == n
    assert "".join(lp.tokens) == expected["text"]
    full = server.post("/tokenize", {"content": prompt + expected["text"], "add_special": True}).json()["tokens"]
    head = server.post("/tokenize", {"content": prompt, "add_special": True}).json()["tokens"]
    assert full[: len(head)] == head
    assert server.post("/detokenize", {"tokens": full[len(head):]}).json()["content"] == expected["text"]


def test_completion_stream_equals_non_stream(client):
    prompt, n = PROMPTS[1], 24
    full = greedy_completion(client, prompt, n)
    s = collect_stream(greedy_completion(client, prompt, n, stream=True, stream_options={"include_usage": True}))
    assert s["text"] == {0: full.choices[0].text}
    assert s["finish"] == {0: "length"}
    assert all(ch.object == "text_completion" and ch.id == s["chunks"][0].id for ch in s["chunks"])
    check_usage(s["usage"], expect_completion=n)
    assert s["usage"].prompt_tokens == full.usage.prompt_tokens
    assert s["usage"].total_tokens == full.usage.total_tokens
    # Without include_usage: no usage chunk at all.
    s = collect_stream(greedy_completion(client, prompt, n, stream=True))
    assert s["usage"] is None and s["text"] == {0: full.choices[0].text} and s["finish"] == {0: "length"}


def test_chat_greedy_matches_afm_chat(client, oracles):
    n = 20
    expected = oracles.chat(CHAT[1]["content"], n, system=CHAT[0]["content"])
    assert expected["finished_by"] == "length", expected
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=n, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL_NAME and r.id
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.message.content == expected["text"], f"server: {c.message.content!r}\nafm chat: {expected['text']!r}"
    assert c.finish_reason == "length"
    check_usage(r.usage, expect_prompt=expected["prompt_tokens"], expect_completion=n)


def test_chat_max_completion_tokens_and_stream(client):
    n = 20
    full = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_completion_tokens=n, temperature=0)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == n
    stream = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    s = collect_stream(stream, chat=True)
    assert s["text"] == {0: full.choices[0].message.content}
    assert s["finish"] == {0: "length"}
    first = s["chunks"][0]
    assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
    assert all(ch.choices[0].delta.role is None for ch in s["chunks"][1:] if ch.choices), "role sent more than once"
    check_usage(s["usage"], expect_prompt=full.usage.prompt_tokens, expect_completion=n)


def test_prefix_cache_reuse_keeps_output(server, oracles):
    """The second identical prompt reuses the cached full blocks of the first (cached_tokens) and
    still produces afm generate's text."""
    n = 16
    expected = oracles.generate(LONG_PROMPT, n)
    client = server.client()
    before = server.metrics()
    first = greedy_completion(client, LONG_PROMPT, n)
    second = greedy_completion(client, LONG_PROMPT, n)
    after = server.metrics()
    p = expected["prompt_tokens"]
    assert p > 3 * BLOCK_SIZE
    for r in (first, second):
        assert r.choices[0].text == expected["text"]
        check_usage(r.usage, expect_prompt=p)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # At least the last prompt token must be computed; every full block before it can be shared.
    assert cached % BLOCK_SIZE == 0 and p - BLOCK_SIZE <= cached <= p - 1, (cached, p)
    assert after["afm_prefix_cache_hits_total"] >= before["afm_prefix_cache_hits_total"] + 1
    assert after["afm_prefix_cache_queries_total"] == before["afm_prefix_cache_queries_total"] + 2


# ---------------------------------------------------------------------------------------------
# stop strings, n, logprobs, seeds
# ---------------------------------------------------------------------------------------------


def test_stop_string(client, oracles):
    prompt = PROMPTS[0]
    unconstrained = oracles.generate(prompt, 32)["text"]
    stop = unconstrained[12:17]  # likely straddles a token boundary: exercises the held-back text
    assert len(stop) == 5 and stop.strip(), unconstrained
    expected = unconstrained[: unconstrained.index(stop)]
    assert expected, unconstrained
    r = greedy_completion(client, prompt, 32, stop=stop)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 32
    # Streamed: nothing of the stop string leaks out, then finish_reason stop.
    s = collect_stream(greedy_completion(client, prompt, 32, stop=stop, stream=True))
    assert s["text"] == {0: expected} and s["finish"] == {0: "stop"}
    # A list: the earliest match wins, wherever it is in the list.
    later = unconstrained[20:24]
    if later not in expected + stop:
        r = greedy_completion(client, prompt, 32, stop=[later, stop, "never-appears-xyz"])
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    # Chat: a stop string picked out of the unconstrained greedy reply.
    reply = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=24, temperature=0)
    text = reply.choices[0].message.content
    chat_stop = text[10:14]
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=24, temperature=0, stop=[chat_stop])
    assert r.choices[0].message.content == text[: text.index(chat_stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_seeded(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=16, temperature=1.0, seed=1234, n=3)
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.text for c in r.choices)
    assert len({c.text for c in r.choices}) > 1, f"3 sampled choices are all the same: {r.choices}"
    # usage counts the tokens of every choice (OpenAI's accounting).
    lengths = sum(16 for c in r.choices if c.finish_reason == "length")
    assert all(c.finish_reason in ("length", "stop") for c in r.choices)
    if lengths == 48:
        assert r.usage.completion_tokens == 48
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The same seed again, streamed this time: the same 3 texts.
    s = collect_stream(client.completions.create(stream=True, **kw))
    assert s["text"] == {c.index: c.text for c in r.choices}
    assert s["finish"] == {c.index: c.finish_reason for c in r.choices}
    # Chat too.
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=1.0, seed=5, n=3)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    assert all(c.message.role == "assistant" for c in chat.choices)


def test_n_choices_greedy_share_the_prompt(client, oracles):
    """n=3 at temperature 0: the choices fork one prefilled prompt, and each is afm generate's
    greedy text."""
    expected = oracles.generate(PROMPTS[0], 16)["text"]
    r = greedy_completion(client, PROMPTS[0], 16, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [expected] * 3
    assert r.usage.completion_tokens == 3 * 16
    s = collect_stream(greedy_completion(client, PROMPTS[0], 16, n=3, stream=True))
    assert s["text"] == {0: expected, 1: expected, 2: expected}


def test_max_batch_bounds_every_step(start_server, oracles):
    """--max-batch 4: no forward step carries more than 4 sequences, counting the choices a
    request forks after its prompt (n=3 here), and every choice is still the greedy text."""
    s = start_server("--weights", "f32", "--max-batch", "4")
    expected = oracles.generate(PROMPTS[1], 16)["text"]
    results, errors = [], []

    def one():
        try:
            results.append(greedy_completion(s.client(), PROMPTS[1], 16, n=3))
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [[c.text for c in r.choices] for r in results] == [[expected] * 3] * 4
    m = s.wait_idle()
    within = m['afm_batch_size_bucket{le="4"}']
    assert within == m["afm_batch_size_count"], f"{m['afm_batch_size_count'] - within:.0f} steps ran more than 4 sequences"


def test_token_id_prompt(client, hf_tokenizer, oracles):
    """A prompt given as token ids (bos included, as HF encodes it) is the same prompt."""
    ids = hf_tokenizer.encode(PROMPTS[2], add_special_tokens=True).ids
    r = greedy_completion(client, ids, 16)
    assert r.choices[0].text == oracles.generate(PROMPTS[2], 16)["text"]
    assert r.usage.prompt_tokens == len(ids)


def test_n_over_limit(client, start_server):
    expect_api_error(400, lambda: client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4, n=17),
                     param="n")  # the default --max-n is 16
    small = start_server("--weights", "f32", "--max-n", "2")
    c = small.client()
    expect_api_error(400, lambda: c.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4, n=3), param="n")
    expect_api_error(400, lambda: c.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, n=3),
                     param="n")
    assert len(c.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4, n=2, seed=1).choices) == 2


def test_completion_logprobs(client):
    prompt, n = PROMPTS[0], 16
    r = greedy_completion(client, prompt, n, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert r.usage.completion_tokens == n and c.finish_reason == "length"
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == c.text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert len(top) == 3, top
        assert all(v <= 0 for v in top.values())
        assert sum(2.718281828459045 ** v for v in top.values()) <= 1 + 1e-4
        # Greedy: the chosen token is the most likely one.
        assert logprob == pytest.approx(max(top.values()), abs=1e-5), (token, logprob, top)
        assert top[token] == pytest.approx(logprob, abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    # Streamed: the same tokens and logprobs, a chunk at a time.
    tokens, logprobs = [], []
    for chunk in greedy_completion(client, prompt, n, logprobs=3, stream=True):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                logprobs += ch.logprobs.token_logprobs
    assert tokens == lp.tokens
    assert logprobs == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_chat_logprobs(client):
    n = 12
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=n, temperature=0, logprobs=True,
                                       top_logprobs=2)
    c = r.choices[0]
    assert r.usage.completion_tokens == n and c.finish_reason == "length"
    content = c.logprobs.content
    assert len(content) == n
    assert "".join(t.token for t in content) == c.message.content
    for t in content:
        assert t.logprob <= 0
        assert t.bytes == list(t.token.encode("utf-8"))
        assert len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert all(a.logprob <= 0 and a.bytes == list(a.token.encode("utf-8")) for a in t.top_logprobs)
        # Greedy: the chosen token is the most likely one.
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
        assert t.token == t.top_logprobs[0].token
    # logprobs without top_logprobs: the chosen tokens only.
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0, logprobs=True)
    assert [len(t.top_logprobs) for t in r.choices[0].logprobs.content] == [0] * 4
    # Not asked for: none.
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


def test_seeded_sampling_reproducible(client):
    def sample(seed, stream=False):
        kw = dict(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=32, temperature=1.0, seed=seed)
        if stream:
            return collect_stream(client.completions.create(stream=True, **kw))["text"][0]
        r = client.completions.create(**kw)
        assert r.choices[0].text
        return r.choices[0].text

    a = sample(7)
    assert sample(7) == a
    assert sample(7, stream=True) == a
    # Different seeds: different text, with overwhelming likelihood over 32 tokens at
    # temperature 1; two more pairs before calling it a failure.
    pairs = [(7, 8), (11, 12), (1001, 2002)]
    assert any(sample(x) != sample(y) for x, y in pairs), "every seed pair gave the same 32 sampled tokens"
    # Chat too.
    kw = dict(model=MODEL_NAME, messages=CHAT, max_tokens=32, temperature=1.0, seed=99)
    assert (client.chat.completions.create(**kw).choices[0].message.content
            == client.chat.completions.create(**kw).choices[0].message.content)


def test_sampling_parameters_accepted(client):
    """top_p, top_k, min_p, penalties and user are honoured fields, not 400s; top_k 1 is greedy."""
    greedy = greedy_completion(client, PROMPTS[0], 12).choices[0].text
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=3,
                                  extra_body={"top_k": 1})
    assert r.choices[0].text == greedy
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0.7, top_p=0.9,
                                  seed=3, presence_penalty=0.5, frequency_penalty=0.5, user="tester",
                                  extra_body={"min_p": 0.05})
    assert r.choices[0].text and r.usage.completion_tokens <= 12


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json(server, path):
    r = server.http.post(path, content=b'{"prompt": "Hi", "max_tokens": ', headers={"Content-Type": "application/json"})
    check_raw_error(r, 400)
    r = server.http.post(path, content=b'["not", "an", "object"]', headers={"Content-Type": "application/json"})
    check_raw_error(r, 400)


BAD_COMPLETIONS = [
    ("wrong type", dict(temperature="hot"), "temperature"),
    ("unknown field", dict(extra_body={"foo": 1}), "foo"),
    ("negative max_tokens", dict(max_tokens=-5), "max_tokens"),
    ("zero max_tokens", dict(max_tokens=0), "max_tokens"),
    ("absurd max_tokens", dict(max_tokens=10**9), "max_tokens"),
    ("max_tokens not an integer", dict(max_tokens=2.5), "max_tokens"),
    ("temperature out of range", dict(temperature=5), "temperature"),
    ("top_p out of range", dict(top_p=1.5), "top_p"),
    ("logprobs over 20", dict(logprobs=21), "logprobs"),
    ("five stop strings", dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("stop not strings", dict(stop=[1, 2]), "stop"),
    ("n zero", dict(n=0), "n"),
    ("stream_options without stream", dict(stream_options={"include_usage": True}), "stream_options"),
    # Found by schemathesis: a bad max_tokens was ignored when max_completion_tokens was also sent.
    ("bad max_tokens beside max_completion_tokens", dict(extra_body={"max_completion_tokens": 1}, max_tokens=10**9),
     "max_tokens"),
]


@pytest.mark.parametrize("why,kw,param", BAD_COMPLETIONS, ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_request(client, why, kw, param):
    args = dict(model=MODEL_NAME, prompt="Hello", max_tokens=4)
    args.update(kw)
    expect_api_error(400, lambda: client.completions.create(**args), param=param)


BAD_CHATS = [
    ("messages not a list", dict(messages="hello"), "messages"),
    ("empty messages", dict(messages=[]), "messages"),
    ("unknown role", dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    ("top_logprobs without logprobs", dict(top_logprobs=2), "top_logprobs"),
    ("top_logprobs over 20", dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("logprobs not a bool", dict(logprobs=3), "logprobs"),
    ("unknown field", dict(extra_body={"bar": True}), "bar"),
    ("wrong type", dict(temperature="hot"), "temperature"),
    ("bad max_tokens beside max_completion_tokens", dict(max_completion_tokens=1, max_tokens=10**9), "max_tokens"),
]


@pytest.mark.parametrize("why,kw,param", BAD_CHATS, ids=[b[0] for b in BAD_CHATS])
def test_bad_chat_request(client, why, kw, param):
    args = dict(model=MODEL_NAME, messages=CHAT, max_tokens=4)
    args.update(kw)
    expect_api_error(400, lambda: client.chat.completions.create(**args), param=param)


def test_missing_prompt_and_messages(server):
    check_raw_error(server.post("/v1/completions", {"max_tokens": 4}), 400, "prompt")
    check_raw_error(server.post("/v1/chat/completions", {"max_tokens": 4}), 400, "messages")


def test_body_over_size_limit(server):
    body = b'{"prompt": "' + b"a" * (9 << 20) + b'", "max_tokens": 1}'
    r = server.http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    check_raw_error(r, 413, type_=None)
    # The server is fine afterwards.
    assert server.http.get("/health").status_code == 200


def test_unknown_endpoint(server):
    check_raw_error(server.http.get("/v1/nothing-here"), 404, type_=None)


def test_a_method_the_endpoint_does_not_have_gets_405_with_allow(server):
    for r, allow in [(server.http.get("/v1/completions"), "POST"), (server.http.post("/health"), "GET"),
                     (server.http.delete("/v1/models"), "GET"), (server.http.put("/tokenize"), "POST")]:
        check_raw_error(r, 405, type_=None)
        assert r.headers["allow"] == allow, r.headers
    assert server.http.get("/health").status_code == 200


def test_prompt_over_context(start_server, hf_tokenizer):
    ctx = 64
    s = start_server("--weights", "f32", "--ctx", str(ctx))
    c = s.client()
    assert c.models.list().data[0].max_model_len == ctx

    def prompt_of(tokens):  # a prompt of exactly `tokens` tokens, bos included
        words = " ".join(["the"] * (tokens - 1))
        assert len(hf_tokenizer.encode(words, add_special_tokens=True).ids) == tokens
        return words

    # 100 tokens in a context of 64.
    e = expect_api_error(400, lambda: c.completions.create(model=MODEL_NAME, prompt=prompt_of(100), max_tokens=1),
                         param="prompt")
    assert "context" in e.response.json()["error"]["message"]
    # Exactly the context: no room left to generate.
    expect_api_error(400, lambda: c.completions.create(model=MODEL_NAME, prompt=prompt_of(ctx), max_tokens=1),
                     param="prompt")
    # The prompt fits but prompt + max_tokens does not.
    expect_api_error(400, lambda: c.completions.create(model=MODEL_NAME, prompt=prompt_of(40), max_tokens=25),
                     param="max_tokens")
    # Exactly the context: fine.
    r = c.completions.create(model=MODEL_NAME, prompt=prompt_of(40), max_tokens=24, temperature=0)
    assert r.usage.prompt_tokens == 40 and r.usage.completion_tokens + 40 <= ctx
    # Chat: a conversation longer than the context.
    long_chat = [{"role": "user", "content": " ".join(["the"] * 100)}]
    expect_api_error(400, lambda: c.chat.completions.create(model=MODEL_NAME, messages=long_chat, max_tokens=4),
                     param="prompt")
    s.wait_idle()


def test_api_key(start_server):
    s = start_server("--weights", "f32", "--api-key", "sekrit")
    # The official client with the wrong key, and a bare request with none.
    wrong = s.client(api_key="wrong-key")
    e = expect_api_error(401, lambda: wrong.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2), type_=None)
    assert isinstance(e, openai.AuthenticationError)
    expect_api_error(401, lambda: s.client(api_key="wrong-key").models.list(), type_=None)
    # A fresh connection for each (test_api_key_refusal_keeps_the_connection_usable covers reuse).
    def post(path, body, headers=None):
        return httpx2.post(s.url + path, json=body, headers=headers or {}, timeout=30)

    for path, body in [("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
                       ("/tokenize", {"content": "Hi"}), ("/detokenize", {"tokens": [1]}),
                       ("/apply-template", {"messages": CHAT})]:
        check_raw_error(post(path, body), 401, type_=None)
        check_raw_error(post(path, body, {"Authorization": "Bearer wrong"}), 401, type_=None)
        check_raw_error(post(path, body, {"Authorization": "sekrit"}), 401, type_=None)
        assert post(path, body, {"Authorization": "Bearer sekrit"}).status_code == 200, path
    check_raw_error(httpx2.get(s.url + "/v1/models", timeout=30), 401, type_=None)
    # /health and /metrics need no key.
    assert s.http.get("/health").status_code == 200
    assert s.http.get("/metrics").status_code == 200
    # The right key through the client.
    ok = s.client(api_key="sekrit")
    r = ok.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    assert r.choices[0].text is not None and r.usage.completion_tokens >= 1
    assert ok.models.list().data[0].id == MODEL_NAME


def test_api_key_refusal_keeps_the_connection_usable(start_server):
    """A 401 on a POST must not leave the request's body unread on a keep-alive connection: the
    official client reuses the connection, and its next request must be answered on its own
    merits (here: 401 again for the wrong key, then 200 with the right one)."""
    s = start_server("--weights", "f32", "--api-key", "sekrit")
    wrong = s.client(api_key="wrong-key")
    for _ in range(2):
        expect_api_error(401, lambda: wrong.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2),
                         type_=None)
    expect_api_error(401, lambda: wrong.models.list(), type_=None)
    # Deterministically, on one raw connection: the headers, then (as httpx does, in a second
    # write) the body; then a request with the right key, which must get its own 200.
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.1)
        sock.sendall(body)
        time.sleep(0.1)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer sekrit\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"HTTP/1.1 ") < 2 and time.monotonic() < deadline:
            try:
                more = sock.recv(65536)
            except socket.timeout:
                break
            if not more:
                break
            data += more
    statuses = re.findall(rb"HTTP/1\.1 (\d{3})", data)
    assert statuses[:1] == [b"401"], data[:300]
    assert statuses[1:2] == [b"200"], f"the request after a refused POST got: {data.decode(errors='replace')[-300:]}"


def test_queue_full_429(start_server):
    """--max-batch 1 --max-queue 1: one request running, one waiting, the next gets 429."""
    s = start_server("--weights", "f32", "--max-batch", "1", "--max-queue", "1")
    # Long enough never to finish by itself here: both streams are cancelled by closing them.
    long = {"prompt": "It is a truth", "max_tokens": 30000, "temperature": 0, "stream": True}
    with httpx2.Client(base_url=s.url, timeout=30) as a, httpx2.Client(base_url=s.url, timeout=30) as b:
        with a.stream("POST", "/v1/completions", json=long) as running:
            assert running.status_code == 200
            events = sse_events(running)  # kept: dropping the iterator would close the stream
            next(events)  # it produces tokens: it is the one running
            with b.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200  # admitted to the queue (its headers are out)
                s.wait_metrics(lambda m: m["afm_requests_running"] == 1 and m["afm_requests_waiting"] == 1,
                               what="one running, one waiting")
                r = s.http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                check_raw_error(r, 429, type_=None)
                assert int(r.headers["Retry-After"]) >= 0, r.headers
                # The official client sees a RateLimitError.
                e = expect_api_error(429, lambda: s.client().completions.create(model=MODEL_NAME, prompt="Hi",
                                                                                  max_tokens=2), type_=None)
                assert isinstance(e, openai.RateLimitError)
                # Several at once: all refused while the queue is full.
                results = []
                threads = [threading.Thread(target=lambda: results.append(
                    httpx2.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)))
                    for _ in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert [r.status_code for r in results] == [429] * 4
    m = s.wait_idle()
    assert m["afm_requests_rejected_queue_full_total"] == 6
    # With the queue empty again, requests are served.
    assert s.client().completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


# ---------------------------------------------------------------------------------------------
# disconnects and shutdown
# ---------------------------------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_request(server):
    max_tokens = 4000
    server.wait_idle()
    before = server.metrics()
    stream = server.client().completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=max_tokens,
                                                temperature=0, stream=True)
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    running = server.metrics()["afm_requests_running"]
    stream.close()  # drops the connection
    m = server.wait_idle(timeout=5)
    generated = m["afm_generation_tokens_total"] - before["afm_generation_tokens_total"]
    assert m["afm_requests_finished_total"] == before["afm_requests_finished_total"] + 1
    assert generated < max_tokens // 2, f"the cancelled request still generated {generated} of {max_tokens} tokens"
    print(f"disconnect: {generated} tokens generated, running {running} at the close")
    assert m["afm_kv_blocks_used"] + m["afm_kv_blocks_free"] == server.pool_blocks()
    assert running == 1, "the stream was closed before (or after) its request ran"
    # The server carries on.
    assert greedy_completion(server.client(), "Hi", 2).usage.completion_tokens == 2


def sigterm_during_stream(s, body, signal_after, check_refused=True):
    """Streams `body` in a thread, sends SIGTERM once signal_after(sse_iterator, events) returns,
    and checks the contract: the stream still ends with every token, its usage chunk and
    [DONE]; a new request is refused (503, or no connection once the server is gone); the server
    exits 0."""
    signalled, result = threading.Event(), {}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}

    def stream():
        try:
            with httpx2.Client(base_url=s.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
                result["status"] = r.status_code
                events = []
                result["events"] = events
                it = sse_events(r)
                signal_after(it, events)
                s.proc.send_signal(signal.SIGTERM)
                signalled.set()
                for data in it:
                    events.append(data)
        except Exception as e:  # reported by the main thread
            result["error"] = repr(e)
        finally:
            signalled.set()

    t = threading.Thread(target=stream)
    t.start()
    assert signalled.wait(30), "the stream never got to the SIGTERM"
    refused_with = None
    if check_refused:
        try:
            r = httpx2.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
            refused_with = r.status_code
            check_raw_error(r, 503, type_=None)
        except httpx2.TransportError as e:
            refused_with = repr(e)
    t.join(60)
    assert not t.is_alive(), "the in-flight stream did not end"
    events = result.get("events", [])
    tail = [e[:100] for e in events[-2:]]
    assert "error" not in result, (f"the in-flight stream broke after {len(events)} events (last: {tail}): "
                                   f"{result['error']}")
    assert result["status"] == 200
    assert events and events[-1] == "[DONE]", tail
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == body["max_tokens"], usage
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    try:
        code = s.proc.wait(20)
    except Exception:
        pytest.fail(f"afm serve did not exit within 20 s of SIGTERM (new request got {refused_with})\n{s.log()}")
    assert code == 0, f"exit code {code}\n{s.log()}"


def test_sigterm_while_decoding(start_server):
    """SIGTERM after the stream's first tokens. The end of the stream races the shutdown, so
    three rounds (a fresh server each)."""
    for _ in range(3):
        s = start_server("--weights", "f32")
        sigterm_during_stream(s, {"prompt": PROMPTS[0], "max_tokens": 600, "temperature": 0},
                              lambda it, events: events.append(next(it)))


def test_sigterm_while_prefilling(start_server):
    """SIGTERM while the request's long prompt is being prefilled (one step, --prefill-chunk
    8192): admitted and running, no token out yet. It must still run to the end."""
    s = start_server("--weights", "f32", "--prefill-chunk", "8192")
    with open(os.path.join(MODEL_DIR, "eval_prompt.txt"), encoding="utf-8") as f:
        prompt = f.read() * 30  # about 3500 tokens: a prefill of a good fraction of a second here
    sigterm_during_stream(s, {"prompt": prompt, "max_tokens": 20, "temperature": 0},
                          lambda it, events: time.sleep(0.1))  # headers out: submitted; give it 0.1 s to start


# ---------------------------------------------------------------------------------------------
# utility endpoints, models, health, metrics
# ---------------------------------------------------------------------------------------------


def test_health_and_models(server, client):
    r = server.http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"
    assert models.data[0].owned_by


@pytest.mark.parametrize("text", ["Hello world", "It is a truth universally acknowledged, that",
                                  "Mr. Darcy's  letter\n\nwas — perhaps — unwelcome. 1811!",
                                  "<|im_start|>user\nHi<|im_end|>"])
def test_tokenize_detokenize(server, hf_tokenizer, text):
    for add_special in (False, True):
        r = server.post("/tokenize", {"content": text, "add_special": add_special})
        assert r.status_code == 200, r.text
        tokens = r.json()["tokens"]
        assert tokens == hf_tokenizer.encode(text, add_special_tokens=add_special).ids, add_special
        r = server.post("/detokenize", {"tokens": tokens})
        assert r.status_code == 200, r.text
        assert r.json()["content"] == hf_tokenizer.decode(tokens, skip_special_tokens=False)
    plain = hf_tokenizer.encode(text, add_special_tokens=False).ids
    assert server.post("/detokenize", {"tokens": plain}).json()["content"] == text
    pieces = server.post("/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain
    if text.isascii():  # a piece may hold part of a multi-byte character (shown lossily)
        assert "".join(p["piece"] for p in pieces) == text


def test_tokenize_bad_input(server):
    check_raw_error(server.post("/tokenize", {"content": 5}), 400, "content")
    check_raw_error(server.post("/tokenize", {"content": "x", "add_special": "yes"}), 400, "add_special")
    check_raw_error(server.post("/detokenize", {"tokens": [10**7]}), 400, "tokens")
    check_raw_error(server.post("/detokenize", {"tokens": "abc"}), 400, "tokens")
    check_raw_error(server.post("/apply-template", {}), 400, "messages")
    check_raw_error(server.http.post("/tokenize", content=b"{oops", headers={"Content-Type": "application/json"}), 400)


def test_apply_template_and_tokenize_messages(server, hf_tokenizer, render_template):
    for messages in (CHAT, [{"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "How are you?"}]):
        r = server.post("/apply-template", {"messages": messages})
        assert r.status_code == 200, r.text
        prompt = r.json()["prompt"]
        assert prompt == render_template(messages)
        by_messages = server.post("/tokenize", {"messages": messages}).json()["tokens"]
        by_prompt = server.post("/tokenize", {"content": prompt, "add_special": False}).json()["tokens"]
        assert by_messages == by_prompt
        assert by_messages == hf_tokenizer.encode(prompt, add_special_tokens=False).ids
    # Content parts (text only) render like the joined string.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert (server.post("/apply-template", {"messages": parts}).json()["prompt"]
            == render_template([{"role": "user", "content": "Hi there"}]))
    # The chat endpoint's prompt is that one: prompt_tokens agrees.
    r = server.client().chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == len(hf_tokenizer.encode(render_template(CHAT), add_special_tokens=False).ids)


def test_metrics_count_requests(server):
    server.wait_idle()
    before = server.metrics()
    r = greedy_completion(server.client(), PROMPTS[2], 10)
    s = collect_stream(server.client().chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=7,
                                                               temperature=0, stream=True,
                                                               stream_options={"include_usage": True}), chat=True)
    after = server.wait_idle()
    names = ["afm_kv_blocks_used", "afm_kv_blocks_free", "afm_prefix_cache_blocks", "afm_prefix_cache_queries_total",
             "afm_prefix_cache_hits_total", "afm_requests_running", "afm_requests_waiting",
             "afm_prompt_tokens_total", "afm_generation_tokens_total"]
    for name in names:
        assert name in after, f"/metrics lacks {name}"
    for h in ["afm_time_to_first_token_seconds", "afm_inter_token_latency_seconds", "afm_e2e_request_latency_seconds",
              "afm_batch_size"]:
        for suffix in ("_sum", "_count", '_bucket{le="+Inf"}'):
            assert h + suffix in after, f"/metrics lacks {h}{suffix}"
        assert after[h + '_bucket{le="+Inf"}'] == after[h + "_count"]
    assert after["afm_prompt_tokens_total"] - before["afm_prompt_tokens_total"] == (
        r.usage.prompt_tokens + s["usage"].prompt_tokens)
    assert after["afm_generation_tokens_total"] - before["afm_generation_tokens_total"] == 10 + 7
    assert after["afm_e2e_request_latency_seconds_count"] - before["afm_e2e_request_latency_seconds_count"] == 2
    assert after["afm_time_to_first_token_seconds_count"] - before["afm_time_to_first_token_seconds_count"] == 2
    # 9 + 6 gaps between consecutive tokens.
    assert after["afm_inter_token_latency_seconds_count"] - before["afm_inter_token_latency_seconds_count"] == 15
    assert after["afm_prefix_cache_queries_total"] - before["afm_prefix_cache_queries_total"] == 2
    assert after["afm_kv_blocks_used"] + after["afm_kv_blocks_free"] == server.pool_blocks()
    assert after["afm_kv_blocks_used"] == after["afm_prefix_cache_blocks"] > 0


# ---------------------------------------------------------------------------------------------
# regressions from review
# ---------------------------------------------------------------------------------------------


def test_sigterm_right_after_listening_still_stops(start_server):
    """A signal that arrives as soon as the address is printed, before the listener runs."""
    for _ in range(10):
        s = start_server("--weights", "f32")
        s.proc.send_signal(signal.SIGTERM)
        try:
            assert s.proc.wait(15) == 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"afm serve ignored a SIGTERM sent right after it started listening\n{s.log()}")


def test_n_choices_cancelled_during_prefill_finish(start_server):
    """A streamed n=2 request whose client leaves while its long prompt is prefilled ends, so the
    server still drains and exits on SIGTERM."""
    s = start_server("--weights", "f32", "--prefill-chunk", "16")
    with open(os.path.join(MODEL_DIR, "eval_prompt.txt"), encoding="utf-8") as f:
        prompt = f.read() * 50  # about 6000 tokens, 16 a step: the prefill takes hundreds of steps
    body = json.dumps({"prompt": prompt, "max_tokens": 50, "n": 2, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(0.05)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # reset: gone while the prompt is still being prefilled
    deadline = time.time() + 20
    while time.time() < deadline:
        text = s.http.get("/metrics").text
        if re.search(r"^afm_requests_finished_total 1$", text, re.M) and re.search(r"^afm_requests_running 0$", text, re.M):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the cancelled n=2 request never finished:\n{text}")
    s.http.close()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0


@pytest.mark.parametrize("body", [{"content": "x", "with_pieces": "yes"},
                                  {"messages": [{"role": "user", "content": [{"type": 5, "text": "x"}]}]}])
def test_wrongly_typed_nested_values_are_400(server, body):
    r = server.http.post("/tokenize", json=body)
    assert r.status_code == 400, r.text
    assert "message" in r.json()["error"]
