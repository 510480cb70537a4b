"""Fixtures for the acceptance tests of `afm serve`: real servers on loopback ports, the official
`openai` client pointed at them, and independent oracles to check their answers against:

  - `afm generate` / `afm chat` (the engine without the server) for greedy text,
  - HF `tokenizers` (tests/oracles/hf_tokenize.py's library) for /tokenize and /detokenize,
  - jinja2 as transformers renders chat templates (tests/oracles/render_chat_template.py) for
    /apply-template.

The binary is $AFM_BINARY (CTest sets it), else build/afm. Every test runs under a SIGALRM
guard (default 60 s, `@pytest.mark.time_limit(seconds)` to change it), so a hung server fails the
test instead of hanging the suite; every server a test starts is stopped when it ends.
"""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree (tests/server, tests/oracles)

import httpx2
import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, "models", "afm-tiny-austen")
MODEL_NAME = "afm-tiny-austen"  # the folder name: what /v1/models lists without --model-name
BLOCK_SIZE = 16  # tokens per KV block (afm serve --help: "KV cache blocks of 16 tokens")
sys.path.insert(0, os.path.join(ROOT, "tests", "oracles"))


def afm_binary():
    binary = os.environ.get("AFM_BINARY") or os.path.join(ROOT, "build", "afm")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no afm binary at {binary} (set AFM_BINARY)")
    return binary


# ---------------------------------------------------------------------------------------------
# Per-test time limit
# ---------------------------------------------------------------------------------------------


# Set by scripts/sanitize.sh: the afm under test is the ASan + UBSan build.
SANITIZED = os.environ.get("AFM_SANITIZED") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "time_limit(seconds): fail the test if it runs longer (default 60)")


class TimeLimitExceeded(Exception):
    pass


@pytest.fixture(autouse=True)
def _time_limit(request):
    marker = request.node.get_closest_marker("time_limit")
    # A sanitizer build runs the server several times slower: its limits stretch, the release
    # build's stay as they are.
    seconds = (int(marker.args[0]) if marker else 60) * (6 if SANITIZED else 1)

    def expire(signum, frame):
        raise TimeLimitExceeded(f"{request.node.nodeid} ran over its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------


def parse_metrics(text):
    """Prometheus text -> {"name" or "name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


class Server:
    """One `afm serve --port 0 ARGS` process, ready once it printed its listening line."""

    def __init__(self, args, tmp_dir, startup_timeout=30.0):
        self.args = list(args)
        self.api_key = None
        if "--api-key" in self.args:
            self.api_key = self.args[self.args.index("--api-key") + 1]
        os.makedirs(tmp_dir, exist_ok=True)
        self.stderr_path = os.path.join(tmp_dir, f"afm-serve-{os.getpid()}-{time.monotonic_ns()}.stderr")
        self._stderr = open(self.stderr_path, "wb")
        command = [afm_binary(), "serve", "--port", "0", *self.args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self._lines = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        self.port = None
        while self.port is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"afm serve {' '.join(self.args)} did not start in {startup_timeout} s\n{self.log()}")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(5)
                raise AssertionError(f"afm serve {' '.join(self.args)} exited with {self.proc.returncode} "
                                     f"before listening\n{self.log()}")
            m = re.match(r"afm serve: listening on http://127\.0\.0\.1:(\d+)$", line.strip())
            if m:
                self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx2.Client(base_url=self.url, timeout=60)
        self._clients = []

    def _read_stdout(self):
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    def log(self, tail=4000):
        self._stderr.flush()
        with open(self.stderr_path, "rb") as f:
            data = f.read().decode("utf-8", "replace")
        return "--- afm serve stderr (tail) ---\n" + data[-tail:]

    def pool_blocks(self):
        """The KV pool size the server reports on stderr at startup ("afm serve: N KV blocks ...")."""
        m = re.search(r"afm serve: (\d+) KV blocks", self.log(tail=1 << 20))
        assert m, f"no KV pool line on stderr\n{self.log()}"
        return int(m.group(1))

    def client(self, api_key=None, timeout=60.0):
        """The official client, no retries (a retry would hide the status being tested)."""
        c = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or self.api_key or "unused",
                          max_retries=0, timeout=timeout)
        self._clients.append(c)
        return c

    def headers(self):
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path, body, **kw):
        return self.http.post(path, json=body, headers=self.headers(), **kw)

    def metrics(self):
        r = self.http.get("/metrics")
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)

    def wait_metrics(self, predicate, timeout=5.0, what="the condition"):
        """Polls /metrics until predicate(metrics) holds; fails with the last metrics seen."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if predicate(m):
                return m
            if time.monotonic() > deadline:
                keys = ("afm_requests_running", "afm_requests_waiting", "afm_kv_blocks_used", "afm_kv_blocks_free",
                        "afm_prefix_cache_blocks", "afm_generation_tokens_total")
                raise AssertionError(f"{what} did not hold within {timeout} s; last metrics: "
                                     f"{ {k: m.get(k) for k in keys} }")
            time.sleep(0.05)

    def wait_idle(self, timeout=5.0):
        """Every request ended: nothing running or waiting, and every KV block in use is one the
        prefix cache holds (the pool's other blocks are all free)."""
        return self.wait_metrics(
            lambda m: m["afm_requests_running"] == 0 and m["afm_requests_waiting"] == 0
            and m["afm_kv_blocks_used"] == m["afm_prefix_cache_blocks"],
            timeout, "idle (running 0, waiting 0, kv_blocks_used == prefix_cache_blocks)")

    def rss_kb(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    def terminate(self, timeout=20.0):
        """SIGTERM, then the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self):
        # Idle keep-alive connections first: the server waits out their keep-alive timeout (5 s)
        # before it exits.
        for c in self._clients:
            c.close()
        self.http.close()
        try:
            self.terminate(10)
        finally:
            self.kill()
            self._stderr.close()


@pytest.fixture(scope="session")
def server_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("afm-serve"))


def _servers(server_tmp):
    """Yields start(*args) -> a Server; every server it started is stopped afterwards."""
    servers = []

    def start(*args):
        s = Server(args, server_tmp)
        servers.append(s)
        return s

    try:
        yield start
    finally:
        for s in servers:
            s.close()


@pytest.fixture
def start_server(server_tmp):
    """start_server(*args) -> a Server, stopped when the test ends."""
    yield from _servers(server_tmp)


@pytest.fixture(scope="module")
def module_server_factory(server_tmp):
    """The same, for servers a whole module shares."""
    yield from _servers(server_tmp)


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------

_REPORT = re.compile(r"prompt tokens: (\d+) \((\d+) cached\) \| generated tokens: (\d+) \|.*finished by (\w+)")


def _report(stderr):
    m = _REPORT.search(stderr)
    assert m, f"no report line in afm's stderr:\n{stderr}"
    return {"prompt_tokens": int(m.group(1)), "generated_tokens": int(m.group(3)), "finished_by": m.group(4)}


class Oracles:
    """`afm generate` and `afm chat` results, cached per argument list."""

    def __init__(self):
        self._cache = {}

    def _run(self, args, stdin=None):
        key = (tuple(args), stdin)
        if key not in self._cache:
            p = subprocess.run([afm_binary(), *args], input=stdin.encode() if stdin is not None else None,
                               capture_output=True, timeout=60)
            assert p.returncode == 0, f"afm {' '.join(args)} failed ({p.returncode}):\n{p.stderr.decode()}"
            self._cache[key] = (p.stdout.decode("utf-8"), p.stderr.decode("utf-8", "replace"))
        return self._cache[key]

    def generate(self, prompt, n, weights="f32"):
        """Greedy continuation of `prompt`: {"text", "prompt_tokens", "generated_tokens", "finished_by"}."""
        out, err = self._run(["generate", "--weights", weights, "--temperature", "0", "-p", prompt, "-n", str(n)])
        # generate prints the prompt, then the continuation, then a newline.
        assert out.startswith(prompt) and out.endswith("\n"), f"unexpected afm generate stdout: {out!r}"
        return {"text": out[len(prompt):-1], **_report(err)}

    def chat(self, user, n, system=None, weights="f32"):
        """Greedy reply to one user turn, through the model's chat template (`afm chat`)."""
        assert "\n" not in user
        args = ["chat", "--weights", weights, "--temperature", "0", "-n", str(n)]
        if system is not None:
            args += ["--system", system]
        out, err = self._run(args, stdin=user + "\n")
        assert out.endswith("\n"), f"unexpected afm chat stdout: {out!r}"
        return {"text": out[:-1], **_report(err)}


@pytest.fixture(scope="session")
def oracles():
    return Oracles()


@pytest.fixture(scope="session")
def hf_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))


@pytest.fixture(scope="session")
def render_template():
    """messages -> the prompt transformers' apply_chat_template(add_generation_prompt=True) renders."""
    import render_chat_template as rct

    with open(os.path.join(MODEL_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    env = rct.make_environment()
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token") if k in config}

    def render(messages):
        return rct.render(env, config["chat_template"], messages, None, True, special)

    return render
