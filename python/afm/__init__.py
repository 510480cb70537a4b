"""afm: Python access to the afm inference engine (C++).

    import afm
    model = afm.build_model("models/afm-tiny-austen", weights="f32")
    cache = model.new_cache()
    logits = model.forward([1, 2, 3], cache)        # numpy float32 [3, vocab], no copy
    for token, text in model.generate("It is a truth", max_new_tokens=20):
        print(text, end="")
"""
import json
import os

from ._afm import Error, KVCache, Tokenizer as _Tokenizer
from . import _afm

__all__ = ["Error", "KVCache", "Model", "Tokenizer", "build_model"]


class Tokenizer:
    """A model's tokenizer (byte-exact with HF tokenizers) and chat template."""

    def __init__(self, path):
        self._t = _Tokenizer.load(os.fspath(path))

    def encode(self, text, add_special_tokens=True):
        return self._t.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens=False):
        return self._t.decode(list(ids), skip_special_tokens)

    @property
    def vocab_size(self):
        return self._t.vocab_size

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        """The prompt the model's chat template renders, as transformers' apply_chat_template does."""
        text = self._t.apply_chat_template_json(json.dumps(messages), add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text


class Model:
    """A model loaded by afm. forward() and generate() release the GIL while they compute."""

    def __init__(self, path, model):
        self.path, self._model, self._tokenizer = path, model, None

    @property
    def tokenizer(self):
        """The model's Tokenizer, loaded on first use (a folder of weights alone needs none to run)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.path)
        return self._tokenizer

    vocab_size = property(lambda self: self._model.vocab_size)
    max_seq_len = property(lambda self: self._model.max_seq_len)
    architecture = property(lambda self: self._model.architecture)
    weights = property(lambda self: self._model.weights)

    def new_cache(self):
        return self._model.new_cache()

    def reserve_kv(self, sequences, positions):
        """Grows the KV block pool (built for one sequence of max_seq_len) to hold `sequences` caches of
        up to `positions` at once. Blocks take memory only once used."""
        self._model.reserve_kv(int(sequences), int(positions))

    def forward(self, input_ids, cache):
        """Logits [len(input_ids), vocab] for input_ids continuing `cache` (which they extend)."""
        return self._model.forward([int(i) for i in input_ids], cache)

    def forward_batch(self, input_ids, caches, last_only=False):
        """One pass over several sequences (each weight read once for all): input_ids[i] continues
        caches[i]. Logits of every token of each sequence in turn, or with last_only one row per sequence."""
        return self._model.forward_batch([[int(i) for i in ids] for ids in input_ids], list(caches), last_only)

    def generate(self, prompt_or_ids, max_new_tokens=128, temperature=None, top_p=1.0, top_k=0, min_p=0.0,
                 repetition_penalty=1.0, seed=0, stop=(), chat=False):
        """Streams (token_id, text) pairs. A string prompt is encoded with special tokens (or, with
        chat=True, taken as the user message of a one-turn chat); temperature None or 0 is greedy."""
        if isinstance(prompt_or_ids, str):
            if chat:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt_or_ids}], tokenize=True)
            else:
                ids = self.tokenizer.encode(prompt_or_ids)
        else:
            ids = [int(i) for i in prompt_or_ids]
        options = _afm.GenerateOptions()
        options.max_new_tokens = max_new_tokens
        eos = list(_afm.generation_defaults(self.path, self._model))
        if chat:
            eos += list(self.tokenizer._t.end_of_turn_ids)
        options.eos_token_ids = eos
        options.stop_strings = list(stop)
        sample = temperature is not None and temperature > 0
        options.set_sampling(sample, float(temperature or 1.0), float(top_p), int(top_k), float(min_p),
                             float(repetition_penalty), int(seed))
        return _afm.Generation(self._model, self.tokenizer._t, ids, options)


def build_model(path, device="cpu", max_seq_len=None, weights="bfp8", threads=None):
    """Loads an HF model folder or a GGUF file. weights: f32, bf16, bfp8 or bfp4."""
    path = os.fspath(path)
    model = _afm.build_model(path, device, int(max_seq_len or 0), weights, int(threads or 0))
    return Model(path, model)
