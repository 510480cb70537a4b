"""afm.hf.AfmForCausalLM under transformers' own generate(), against transformers' own models: the same
tokens for greedy, seeded sampling and beam search, with the same logits processors, stopping criteria and
streamers; the note's eval (python -m afm.eval) on the real SmolLM2. Needs torch and transformers
(scripts/install-deps.sh --reference, which scripts/test.sh runs)."""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

import afm
import afm.hf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SMOLLM2 = os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
LONG_PROMPT = os.path.join(FIXTURES, "smollm2-reference", "prompt-long.txt")

CHECKPOINTS = {
    "tiny-arcee": os.path.join(FIXTURES, "tiny-arcee"),
    "tiny-llama": os.path.join(FIXTURES, "tiny-llama"),
    "smollm2": SMOLLM2,
}


def hf_source(path):
    """from_pretrained's arguments for a folder or a GGUF file."""
    if path.endswith(".gguf"):
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    return path, {}


@functools.lru_cache(maxsize=None)
def load_hf(path):
    """transformers' model for a checkpoint, loaded once (SmolLM2's GGUF takes it ~20 s to dequantize).
    Tests that change a model load their own."""
    folder, extra = hf_source(path)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **extra).eval()


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def pair(request):
    """(name, transformers' model, afm's AfmForCausalLM with f32 weights) for one checkpoint."""
    path = CHECKPOINTS[request.param]
    return request.param, load_hf(path), afm.hf.build_model(path, "cpu", max_seq_len=1024, weights="f32")


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    folder, extra = hf_source(SMOLLM2)
    return AutoTokenizer.from_pretrained(folder, **extra)


def prompt_ids(name):
    """A [1, T] prompt: HF's tokenization of a sentence for SmolLM2, the fixture's first prompt otherwise."""
    if name == "smollm2":
        return smollm2_tokenizer()("The capital of France is", return_tensors="pt").input_ids
    return torch.from_numpy(load_file(os.path.join(CHECKPOINTS[name], "reference.safetensors"))["prompt.0.ids"])[None]


def generate_both(hf, ours, ids, **kwargs):
    """Both models' generate() on the same inputs, each from the same torch RNG state."""
    outs = []
    for model in (hf, ours):
        torch.manual_seed(1234)
        outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs))
    return outs


def test_greedy_64_tokens_equal_transformers(pair):
    name, hf, ours = pair
    want, got = generate_both(hf, ours, prompt_ids(name), do_sample=False, max_new_tokens=64, min_new_tokens=64)
    assert got.shape == want.shape and got.shape[1] == prompt_ids(name).shape[1] + 64
    assert got.tolist() == want.tolist()


def test_seeded_sampling_equals_transformers(pair):
    name, hf, ours = pair
    kwargs = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1,
                  max_new_tokens=48, num_return_sequences=2)
    want, got = generate_both(hf, ours, prompt_ids(name), **kwargs)
    assert got.tolist() == want.tolist()
    # A different seed draws a different continuation: the RNG really drives both.
    torch.manual_seed(99)
    other = ours.generate(prompt_ids(name), attention_mask=torch.ones_like(prompt_ids(name)), **kwargs)
    assert other.tolist() != got.tolist()


def test_beam_search_equals_transformers(pair):
    name, hf, ours = pair
    kwargs = dict(num_beams=4, num_return_sequences=4, do_sample=False, max_new_tokens=32,
                  output_scores=True, return_dict_in_generate=True)
    want, got = generate_both(hf, ours, prompt_ids(name), **kwargs)
    assert got.sequences.tolist() == want.sequences.tolist()
    np.testing.assert_allclose(got.sequences_scores.numpy(), want.sequences_scores.numpy(), rtol=1e-4, atol=1e-5)


def test_beam_reordering_forks_block_tables():
    ours = afm.hf.build_model(CHECKPOINTS["tiny-llama"], "cpu", max_seq_len=256, weights="f32")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [30, 31] * 9])
    out = ours(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    before = [list(r.blocks) for r in cache.rows]
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    after = [list(r.blocks) for r in cache.rows]
    # 18 positions in blocks of 16: the full first block is shared, the partial second is copied.
    assert after[0] == before[1]                # the first pick of row 1 moves as it is
    assert after[1][0] == before[1][0]          # its fork shares the full block ...
    assert after[1][1] != before[1][1]          # ... and owns a copy of the partial one
    assert after[2] == before[0]
    # The forked rows continue exactly like the original.
    step = ours(input_ids=torch.tensor([[40], [40], [40]]), past_key_values=cache)
    np.testing.assert_array_equal(step.logits[0].numpy(), step.logits[1].numpy())
    hf = load_hf(CHECKPOINTS["tiny-llama"])
    want = hf(input_ids=torch.cat([ids[1:], torch.tensor([[40]])], dim=1)).logits[0, -1].detach()
    np.testing.assert_allclose(step.logits[1, -1].numpy(), want.numpy(), atol=1e-4)


PADDED_IDS = torch.tensor([[0, 0, 0, 0, 17, 240, 9, 17, 240], [3, 400, 23, 99, 7, 250, 3, 400, 23]])
PADDED_MASK = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [1] * 9])


@pytest.mark.parametrize("mode", [
    dict(do_sample=False),
    dict(do_sample=False, prefill_chunk_size=2),  # chunks that are all padding for the first row
    dict(do_sample=False, use_cache=False),       # the whole sequence every step, a fresh cache each time
    dict(do_sample=False, prompt_lookup_num_tokens=3, num_return_sequences=1),  # candidates, then crop()
    dict(num_beams=4, do_sample=False),
], ids=["greedy", "chunked-prefill", "no-cache", "prompt-lookup", "beams"])
def test_generation_modes_on_a_left_padded_batch_equal_transformers(mode):
    """A small context (64 positions): the block pool grows to hold every row generate runs at once."""
    path = CHECKPOINTS["tiny-llama"]
    hf, ours = load_hf(path), afm.hf.build_model(path, "cpu", max_seq_len=64, weights="f32")
    batch = 1 if "prompt_lookup_num_tokens" in mode else 2  # transformers' prompt lookup takes one row
    outs = [model.generate(PADDED_IDS[-batch:], attention_mask=PADDED_MASK[-batch:], max_new_tokens=40,
                           pad_token_id=0, **mode).tolist() for model in (hf, ours)]
    assert outs[1] == outs[0]


def test_right_padding_and_continuation():
    path = CHECKPOINTS["tiny-llama"]
    hf, ours = load_hf(path), afm.hf.build_model(path, "cpu", max_seq_len=128, weights="f32")
    with pytest.raises(ValueError, match="left padding"):
        ours(input_ids=PADDED_IDS, attention_mask=PADDED_MASK.flip(1))
    # generate again on the cache the first call returned, with the full sequence: as transformers does.
    ids = PADDED_IDS[1:]
    results = []
    for model in (hf, ours):
        first = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               return_dict_in_generate=True)
        again = model.generate(first.sequences, attention_mask=torch.ones_like(first.sequences),
                               past_key_values=first.past_key_values, max_new_tokens=8, do_sample=False)
        results.append(again.tolist())
    assert results[1] == results[0]


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamer_and_stop_strings_equal_transformers():
    hf, ours = load_hf(SMOLLM2), afm.hf.build_model(SMOLLM2, "cpu", max_seq_len=512, weights="f32")
    tokenizer = smollm2_tokenizer()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    results = []
    for model in (hf, ours):
        streamer = Collect()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=60,
                             stop_strings=["."], tokenizer=tokenizer, streamer=streamer)
        results.append((out.tolist(), streamer.chunks, streamer.ended))
    assert results[1] == results[0]
    out, chunks, ended = results[1]
    assert ended and len(out[0]) < ids.shape[1] + 60  # stopped by the string, not the length
    assert tokenizer.decode(out[0][ids.shape[1]:]).endswith(".")
    assert [t for c in chunks[1:] for t in c] == out[0][ids.shape[1]:]  # the streamer saw every token


@pytest.mark.parametrize("name", ["tiny-arcee", "tiny-llama"])
def test_forward_logits_match_the_reference_fixtures(name):
    """CausalLMOutputWithPast logits within 1e-4 of transformers' stored logits, prefill then a cached step."""
    ref = load_file(os.path.join(CHECKPOINTS[name], "reference.safetensors"))
    ours = afm.hf.build_model(CHECKPOINTS[name], "cpu", max_seq_len=1024, weights="f32")
    ids = torch.from_numpy(ref["prompt.0.ids"])[None]
    out = ours(input_ids=ids, use_cache=True)
    np.testing.assert_allclose(out.logits[0].numpy(), ref["prompt.0.logits"], atol=1e-4 * max(1, np.abs(ref["prompt.0.logits"]).max()))
    step = ours(input_ids=torch.from_numpy(ref["prompt.0.generated"][:1])[None], past_key_values=out.past_key_values)
    np.testing.assert_allclose(step.logits[0, -1].numpy(), ref["prompt.0.decode_logits"][1], atol=1e-4 * 10)
    assert out.past_key_values.rows[0].length == ids.shape[1] + 1  # the engine's cache holds them


def test_build_model_from_an_in_memory_transformers_model():
    """The note's signature on a model object: afm runs the weights as they are in memory."""
    folder, _ = hf_source(CHECKPOINTS["tiny-llama"])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # not what the checkpoint on disk holds
    ours = afm.hf.build_model(hf, "cpu", 256)
    ids = torch.tensor([[1, 400, 23, 99, 7, 250]])
    np.testing.assert_allclose(ours(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.detach().numpy(), atol=1e-4)
    assert ours.generation_config.to_dict() == hf.generation_config.to_dict()
    assert ours.generation_config is not hf.generation_config


def test_bad_inputs_raise_clear_errors():
    ours = afm.hf.build_model(CHECKPOINTS["tiny-llama"], "cpu", max_seq_len=64, weights="f32")
    with pytest.raises(ValueError, match="input_ids"):
        ours(inputs_embeds=torch.zeros(1, 2, 8))
    with pytest.raises(TypeError, match="AfmCache"):
        ours(input_ids=torch.tensor([[1, 2]]), past_key_values=object())
    with pytest.raises(afm.Error, match="64"):
        ours(input_ids=torch.ones(1, 65, dtype=torch.int64))  # past the context
    with pytest.raises(TypeError, match="path or a transformers"):
        afm.hf.build_model(42)
    with pytest.raises(ValueError, match="hidden states"):
        ours(input_ids=torch.tensor([[1, 2]]), output_hidden_states=True)
    with pytest.raises(afm.Error, match="None"):
        ours.engine.forward_batch([[1]], [None])


def test_the_eval_reference_is_the_raw_argmax_for_every_step():
    """Whatever the checkpoint's generation config says (eos, penalties), the reference runs every step
    and takes the model's own argmax."""
    from afm.eval import hf_reference
    folder, _ = hf_source(CHECKPOINTS["tiny-llama"])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = [1, 400, 23, 99, 7, 250]
    plain = hf_reference(hf, prompt, 20)
    hf.generation_config.eos_token_id = plain.generated[1]  # would stop generate() after 2 tokens
    hf.generation_config.repetition_penalty = 5.0
    ref = hf_reference(hf, prompt, 20)
    assert ref.generated == plain.generated and len(ref.generated) == 20
    assert ref.decode_logits.argmax(1).tolist() == ref.generated
    with torch.no_grad():
        full = hf(input_ids=torch.tensor([prompt + ref.generated[:-1]])).logits[0]
    np.testing.assert_allclose(ref.decode_logits, full[len(prompt) - 1:].numpy(), atol=1e-4)
    np.testing.assert_allclose(ref.logits, full[:len(prompt)].numpy(), atol=1e-4)


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "afm.eval", *args], capture_output=True, text=True)


def test_eval_on_smollm2_meets_the_notes_bar():
    r = run_eval("--model", SMOLLM2, "--prompt-file", LONG_PROMPT, "--max-new-tokens", "100",
                 "--weights", "f32,bfp8", "--json")
    assert r.returncode == 0, r.stderr
    formats = json.loads(r.stdout)["formats"]
    assert formats["f32"]["steps"] == 100 and formats["f32"]["top1"] == 1.0
    assert formats["f32"]["decode_max_rel_err"] < 1e-4 and formats["f32"]["prefill_max_rel_err"] < 1e-4
    assert formats["bfp8"]["top1"] >= 0.98 and formats["bfp8"]["top5"] == 1.0


def test_eval_reports_bad_arguments():
    r = run_eval("--model", os.path.join(ROOT, "no-such-model"), "--prompt", "hi")
    assert r.returncode != 0 and "no-such-model" in r.stderr and "Traceback" not in r.stderr
    r = run_eval("--model", SMOLLM2, "--prompt", "hi", "--weights", "int3")
    assert r.returncode == 2 and "int3" in r.stderr
