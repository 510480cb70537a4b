"""`afm serve` fuzzed over HTTP by schemathesis, against its own OpenAPI description
(src/server/openapi.json).

Each operation of the description gets generated requests (valid ones, and ones that break the
schema in one place), sent to a real server on the embedded model with an API key; every response
must:
  - not be a 5xx (the engine never fails on these inputs, and nothing is shutting down),
  - have a status, a Content-Type, headers and a body the description documents for it,
  - be a 4xx with OpenAI's error body (`error.code` the HTTP status) for a request that breaks the
    schema, and without the key for an operation that needs one,
  - be a 2xx for a request the schema allows, unless it is refused (400) for one of the limits the
    schema cannot say (ACCEPTED_REFUSALS: the prompt's tokens against the context, best_of == n),
  - for a stream: server-sent events whose every `data:` is a chunk of the description's
    CompletionChunk / ChatCompletionChunk, one finish_reason per choice, ending with [DONE].
Afterwards the server is still up, and idle: nothing running or waiting, every KV block back.

The server runs with a small context and --max-n, so generation ends quickly; the description's
flag-dependent limits (context, --max-n, the vocabulary) are written into the copy of the schema
schemathesis generates from, as the descriptions say they apply.

AFM_SCHEMATHESIS_EXAMPLES (default 25) sets the examples per operation of the fuzzing phase:
scripts/fuzz.sh runs it longer.
"""
import json
import os
import re
import tempfile

# Hypothesis keeps its caches (no example database here) outside the source tree.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "afm-hypothesis"))

import hypothesis
import jsonschema_rs
import pytest
import schemathesis
from schemathesis.specs.openapi import checks as openapi_checks

from conftest import MODEL_DIR, ROOT

SPEC_PATH = os.path.join(ROOT, "src", "server", "openapi.json")
EXAMPLES = int(os.environ.get("AFM_SCHEMATHESIS_EXAMPLES", "25"))
CONTEXT = 128
MAX_N = 2
API_KEY = "schemathesis-key"
SERVER_ARGS = ("--ctx", str(CONTEXT), "--max-n", str(MAX_N), "--max-batch", "4", "--max-queue", "4",
               "--api-key", API_KEY)
# Seconds per operation (its fuzzing and coverage phases): generous for 25 examples on 2 cores,
# scaled for longer runs.
TIME_LIMIT = 60 + 3 * EXAMPLES

# 400s a schema-valid request may get: what the schema cannot say (the prompt's length in tokens
# against the context, best_of equal to n).
ACCEPTED_REFUSALS = re.compile(
    r"This model's maximum context length is"  # prompt (+ max_tokens) past the context
    r"|best_of must equal n"
)


def vocab_size():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def load_spec():
    with open(SPEC_PATH, encoding="utf-8") as f:
        return json.load(f)


def specialized_spec():
    """The description with the limits of this server (SERVER_ARGS, the model) in its schemas."""
    spec = load_spec()
    schemas = spec["components"]["schemas"]
    schemas["TokenId"]["maximum"] = vocab_size() - 1
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            props[field]["maximum"] = CONTEXT
        props["n"]["maximum"] = MAX_N
    schemas["CompletionRequest"]["properties"]["best_of"]["maximum"] = MAX_N
    return spec


# ---------------------------------------------------------------------------------------------
# Checks of our own
# ---------------------------------------------------------------------------------------------


def _to_json_schema(node):
    """OpenAPI 3.0's nullable -> JSON Schema's null alternative (for the chunk validators)."""
    if isinstance(node, list):
        return [_to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable"):
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
        return {"anyOf": [out, {"type": "null"}]}
    return out


def _validator(spec, name):
    root = {"$ref": f"#/components/schemas/{name}", "components": _to_json_schema(spec["components"])}
    return jsonschema_rs.Draft202012Validator(root)


SPEC = load_spec()
CHUNK_VALIDATORS = {"/v1/completions": _validator(SPEC, "CompletionChunk"),
                    "/v1/chat/completions": _validator(SPEC, "ChatCompletionChunk")}
ERROR_VALIDATOR = _validator(SPEC, "Error")


def _content_type(response):
    return ",".join(response.headers.get("content-type", [])).split(";")[0].strip()


def error_body(ctx, response, case):
    """A 4xx or 5xx has OpenAI's error body, with the HTTP status as its code."""
    if response.status_code < 400:
        return None
    assert _content_type(response) == "application/json", f"error with Content-Type {_content_type(response)!r}"
    body = response.json()
    ERROR_VALIDATOR.validate(body)
    assert body["error"]["code"] == response.status_code, f"error.code {body['error']['code']} on HTTP {response.status_code}"
    assert body["error"]["message"], "an empty error message"
    return None


def accepted_if_valid(ctx, response, case):
    """schemathesis's positive_data_acceptance, less the refusals the schema cannot express."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code < 400:
        return None
    if response.status_code == 400 and ACCEPTED_REFUSALS.search(response.json()["error"]["message"]):
        return None
    raise AssertionError(f"a request the schema allows got {response.status_code}: {response.text[:500]}")


def event_stream(ctx, response, case):
    """A 200 text/event-stream: each event a chunk of the description, ending with [DONE]."""
    if response.status_code != 200 or _content_type(response) != "text/event-stream":
        return None
    if getattr(response, "stream_cut_short", False):
        raise AssertionError("the stream did not end within the request timeout or event limit")
    validator = CHUNK_VALIDATORS[case.operation.path]
    events = [e for e in response.text.split("\n\n") if e]
    data = []
    for event in events:
        if event.startswith(":"):  # the waiting comment
            continue
        assert event.startswith("data: ") and "\n" not in event, f"malformed event {event!r}"
        data.append(event[len("data: "):])
    assert data and data[-1] == "[DONE]", f"the stream does not end with [DONE]: {data[-3:]}"
    finished = set()
    body = case.body if isinstance(case.body, dict) else {}
    n = body.get("n") or 1
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunks = [json.loads(d) for d in data[:-1]]
    for i, chunk in enumerate(chunks):
        assert "error" not in chunk, f"the stream failed: {chunk}"
        validator.validate(chunk)
        if include_usage:
            assert "usage" in chunk, f"no usage field with include_usage: {chunk}"
            if i == len(chunks) - 1:
                assert chunk["choices"] == [] and chunk["usage"] is not None, f"the last chunk is not the usage: {chunk}"
                continue
            assert chunk["usage"] is None, f"usage on a chunk with choices: {chunk}"
        assert len(chunk["choices"]) == 1, f"a chunk with {len(chunk['choices'])} choices: {chunk}"
        choice = chunk["choices"][0]
        assert choice["index"] < n and choice["index"] not in finished, f"unexpected chunk: {chunk}"
        if choice["finish_reason"] is not None:
            finished.add(choice["index"])
    assert finished == set(range(n)), f"choices {sorted(set(range(n)) - finished)} never finished"
    return None


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

# GET /openapi.json is a static document: test_openapi_route_serves_the_file checks it instead.
schema = schemathesis.openapi.from_dict(specialized_spec()).exclude(path="/openapi.json")
schema.config.update(request_timeout=30)
schema.config.max_stream_events = 100_000  # read whole streams (the default stops after 20 events)
# Failure reports show the bodies as sent: the default masks any field named like a secret, which
# here means max_tokens (and the test's own API key).
schema.config.output.sanitization.enabled = False

ADDITIONAL_CHECKS = [error_body, accepted_if_valid, event_stream]
# positive_data_acceptance: replaced by accepted_if_valid. unsupported_method: a method a path does
# not have gets 405 with Allow (test_server.py), but httplib refuses methods it does not know at
# all, like TRACE, with 400 before any route is looked up.
EXCLUDED_CHECKS = [openapi_checks.positive_data_acceptance, openapi_checks.unsupported_method]


@pytest.fixture(scope="module")
def server(module_server_factory):
    return module_server_factory(*SERVER_ARGS)


@pytest.mark.time_limit(TIME_LIMIT)
@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck), print_blob=False)
def test_api(case, server):
    case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                           additional_checks=ADDITIONAL_CHECKS, excluded_checks=EXCLUDED_CHECKS)


def test_server_survived(server):
    """After the fuzzing (the tests above ran first): still up, and every request ended."""
    assert server.proc.poll() is None, f"the server exited with {server.proc.returncode}\n{server.log()}"
    r = server.http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
    server.wait_idle()


def test_openapi_route_serves_the_file(server):
    """GET /openapi.json is src/server/openapi.json, byte for byte, without the API key."""
    r = server.http.get("/openapi.json")
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"].split(";")[0] == "application/json", r.headers
    with open(SPEC_PATH, "rb") as f:
        assert r.content == f.read()
    assert r.json() == SPEC
