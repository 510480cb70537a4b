"""The afm Python package (python/) against independent references: HF's logits fixtures, HF
tokenizers, jinja2's rendering of the chat template, and the afm CLI's own generate."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

import afm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
AUSTEN = os.path.join(ROOT, "models", "afm-tiny-austen")
AFM = os.environ.get("AFM_BINARY", os.path.join(ROOT, "build", "afm"))

def load_file(path):
    """The tensors of a .safetensors file (8-byte header size, JSON header, raw little-endian data)."""
    dtypes = {"F32": np.float32, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    return {name: np.frombuffer(data[t["data_offsets"][0]:t["data_offsets"][1]], dtypes[t["dtype"]]).reshape(t["shape"])
            for name, t in header.items() if name != "__metadata__"}


CHECKPOINTS = {  # model folder, its HF reference
    "tiny-arcee": (os.path.join(FIXTURES, "tiny-arcee"), os.path.join(FIXTURES, "tiny-arcee", "reference.safetensors")),
    "tiny-llama": (os.path.join(FIXTURES, "tiny-llama"), os.path.join(FIXTURES, "tiny-llama", "reference.safetensors")),
    "afm-tiny-austen": (AUSTEN, os.path.join(FIXTURES, "afm-tiny-austen-reference", "reference.safetensors")),
}


@pytest.fixture(scope="module")
def austen():
    return afm.build_model(AUSTEN, weights="f32")


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_forward_matches_transformers(name):
    folder, reference = CHECKPOINTS[name]
    ref = load_file(reference)
    model = afm.build_model(folder, weights="f32", max_seq_len=1024)
    prompts = sorted({k.split(".")[1] for k in ref if k.endswith(".ids")})
    for p in prompts:
        ids = ref[f"prompt.{p}.ids"].tolist()
        cache = model.new_cache()
        logits = model.forward(ids, cache)
        want = ref[f"prompt.{p}.logits"]
        assert logits.shape == want.shape
        scale = max(1.0, float(np.abs(want).max()))
        assert float(np.abs(logits - want).max()) <= 1e-4 * scale, f"{name} prompt {p}"
        assert cache.length == len(ids)
        # Teacher-forced decode steps: each generated token continues the cache.
        generated = ref[f"prompt.{p}.generated"].tolist()
        step = model.forward(generated[:1], cache)
        want_step = ref[f"prompt.{p}.decode_logits"][1]
        assert float(np.abs(step[0] - want_step).max()) <= 1e-4 * max(1.0, float(np.abs(want_step).max()))


def test_logits_are_a_view_of_the_engines_buffer(austen):
    logits = austen.forward([1, 2, 3], austen.new_cache())
    assert logits.dtype == np.float32 and logits.shape == (3, austen.vocab_size)
    assert not logits.flags["OWNDATA"]  # NumPy does not own it: no copy was made
    held = austen.forward([4], austen.new_cache())
    del austen  # the array keeps the engine's buffer alive on its own
    assert np.isfinite(held).all()


def test_generate_greedy_equals_the_cli(austen):
    prompt = "It is a truth universally acknowledged"
    text = "".join(t for _, t in austen.generate(prompt, max_new_tokens=40))
    cli = subprocess.run([AFM, "generate", "--weights", "f32", "--temperature", "0", "-n", "40", "-p", prompt],
                         capture_output=True, text=True, check=True).stdout
    assert cli.rstrip("\n") == prompt + text


def test_generate_streams_tokens_and_stops(austen):
    generation = austen.generate("It is a truth", max_new_tokens=12)
    pairs = list(generation)
    assert len(pairs) == 12 and generation.finish_reason == "length"
    ids = [token for token, _ in pairs]
    assert austen.tokenizer.decode(ids) == "".join(text for _, text in pairs)
    full = "".join(text for _, text in pairs)
    stop = full[5:9]
    stopped = "".join(t for _, t in austen.generate("It is a truth", max_new_tokens=12, stop=[stop]))
    assert stopped == full[: full.index(stop)]


def test_seeded_sampling_repeats(austen):
    run = lambda seed: [t for t, _ in austen.generate("It is", max_new_tokens=24, temperature=1.0, seed=seed)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_tokenizer_matches_hf_tokenizers():
    ours = afm.Tokenizer(AUSTEN)
    theirs = HFTokenizer.from_file(os.path.join(AUSTEN, "tokenizer.json"))
    for text in ["It is a truth universally acknowledged.", "  spaces\tand\nnewlines ", "naïve café — 1234567", ""]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=True).ids
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False).ids
        ids = theirs.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_jinja2(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Mr Darcy?"}]
    config = json.load(open(os.path.join(AUSTEN, "tokenizer_config.json")))
    template = tmp_path / "t.jinja"
    template.write_text(config["chat_template"])
    (tmp_path / "m.json").write_text(json.dumps(messages))
    oracle = os.path.join(ROOT, "tests", "oracles", "render_chat_template.py")
    want = subprocess.run([sys.executable, oracle, "--template", str(template), "--messages", str(tmp_path / "m.json"),
                           "--add-generation-prompt", "--var", "bos_token=" + json.dumps(config.get("bos_token")),
                           "--var", "eos_token=" + json.dumps(config.get("eos_token"))],
                          capture_output=True, text=True, check=True).stdout
    tok = afm.Tokenizer(AUSTEN)
    assert tok.apply_chat_template(messages) == want
    assert tok.apply_chat_template(messages, tokenize=True) == tok.encode(want, add_special_tokens=False)


def test_errors_are_afm_errors(austen):
    with pytest.raises(afm.Error, match="not found"):
        afm.build_model("/no/such/model")
    with pytest.raises(afm.Error, match="weight format"):
        afm.build_model(AUSTEN, weights="fp7")
    with pytest.raises(afm.Error, match="vocabulary"):
        austen.forward([austen.vocab_size + 5], austen.new_cache())
    with pytest.raises(afm.Error):
        list(austen.generate([], max_new_tokens=1))
    assert issubclass(afm.Error, RuntimeError)


def test_forward_releases_the_gil(austen):
    """While one long forward runs in a thread, this thread keeps running Python."""
    ids = (austen.tokenizer.encode("It is a truth universally acknowledged, that a single man ") * 60)[:1500]
    cache = austen.new_cache()
    worker = threading.Thread(target=austen.forward, args=(ids, cache))
    worker.start()
    iterations = 0
    while worker.is_alive():
        iterations += 1
        time.sleep(0)
    worker.join()
    assert cache.length == len(ids)
    assert iterations > 50, "the main thread could not run while forward computed"


def test_threads_share_a_model_safely(austen):
    """forward from several threads at once (the GIL released) takes turns on the model."""
    ids = austen.tokenizer.encode("It is a truth universally acknowledged, that a single man")
    want = austen.forward(ids, austen.new_cache()).copy()
    results, errors = [], []

    def run():
        try:
            for _ in range(5):
                results.append(austen.forward(ids, austen.new_cache()).copy())
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a forward never returned"
    assert not errors
    assert len(results) == 20 and all(np.array_equal(r, want) for r in results)
