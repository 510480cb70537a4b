"""afm under transformers' API: a PreTrainedModel + GenerationMixin whose forward runs afm's engine,
so that transformers' own generate() (greedy, sampling, beam search, logits processors, stopping
criteria, streamers) drives it.

    from afm.hf import build_model
    model = build_model("path/to/checkpoint", "cpu", max_seq_len=2048, weights="bfp8")
    out = model.generate(input_ids, max_new_tokens=64, num_beams=4)

Needs torch and transformers (scripts/install-deps.sh --reference).
"""
import copy
import json
import os
import tempfile

import numpy as np
import torch
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import afm

__all__ = ["AfmCache", "AfmForCausalLM", "build_model"]


class AfmCache:
    """The KV cache transformers' generation loop carries: one afm block table per row of the batch.

    Rows hold only their real tokens (left padding is dropped), so a row's positions are exactly
    the ones transformers derives from the attention mask. Beam search reorders rows by forking
    block tables: full blocks are shared, never copied."""

    is_compileable = False  # no static shape for torch.compile: generate must not try
    is_croppable = True  # block tables truncate: assisted and prompt-lookup decoding can roll back

    def __init__(self, engine):
        self._engine = engine
        self.rows = []  # afm KVCache per batch row, made by the first forward
        self._columns = 0  # input columns seen, padding included (what HF's caches count)

    def get_seq_length(self, layer_idx=0):
        return self._columns

    def activate_past_recording(self):
        """Nothing to record: every position stays in its blocks until crop() drops it."""

    def crop(self, tokens_to_remove):
        """Drops the last -tokens_to_remove columns (transformers 5 passes a count <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the number of tokens to remove as a negative int, not {tokens_to_remove}")
        drop = min(-tokens_to_remove, self._columns)
        for row in self.rows:  # padding is on the left, so the dropped columns are real tokens
            row.truncate(max(row.length - drop, 0))
        self._columns -= drop

    def reorder_cache(self, beam_idx):
        """Row i continues old row beam_idx[i]. An old row picked once moves as it is; each further pick
        of it is a fork, so beams that share a history share its blocks."""
        picked, rows = set(), []
        for i in beam_idx.tolist():
            rows.append(self.rows[i].fork() if i in picked else self.rows[i])
            picked.add(i)
        self.rows = rows

    def _ensure_rows(self, batch_size):
        if not self.rows:
            self.rows = [self._engine.new_cache() for _ in range(batch_size)]
        elif len(self.rows) != batch_size:
            raise ValueError(f"AfmCache holds {len(self.rows)} rows but the input has {batch_size}")


class AfmForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose forward is afm's. Its config is the checkpoint's own transformers config;
    it has no torch parameters (the weights live in afm, in the chosen format)."""

    config_class = PretrainedConfig
    base_model_prefix = "afm"
    main_input_name = "input_ids"

    def __init__(self, config, engine):
        super().__init__(config)
        self.engine = engine  # an afm.Model
        self.post_init()

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32  # afm returns float32 logits whatever the weight format

    def get_input_embeddings(self):
        raise NotImplementedError("afm's embeddings live in the engine; generate from input_ids, not inputs_embeds")

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        # Every row generate will run (beams, return sequences) must fit in afm's block pool at once.
        rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        self.engine.reserve_kv(rows, max_cache_length)
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = AfmCache(self.engine)

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, use_cache=None, logits_to_keep=0, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=True, **kwargs):
        """Logits [batch, kept positions, vocab] for input_ids continuing past_key_values (an AfmCache;
        None starts one). With an attention_mask, a row's masked columns are padding: only left
        padding is supported, as for generation with any decoder-only model."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("AfmForCausalLM takes input_ids (afm embeds tokens itself)")
        if labels is not None:
            raise ValueError("AfmForCausalLM is for inference: it computes no loss")
        if output_attentions or output_hidden_states:
            raise ValueError("AfmForCausalLM returns logits only (no attentions or hidden states)")
        cache = AfmCache(self.engine) if past_key_values is None else past_key_values
        if not isinstance(cache, AfmCache):
            raise TypeError(f"past_key_values must be an AfmCache, not {type(cache).__name__}")
        input_ids = torch.as_tensor(input_ids)
        batch, columns = input_ids.shape
        cache._ensure_rows(batch)
        ids = input_ids.tolist()
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).bool()
            if bool((mask[:, :-1] & ~mask[:, 1:]).any()):  # a 1 followed by a 0
                raise ValueError("AfmForCausalLM needs left padding: a row's mask has padding after a token")
            keep_columns = mask[:, -columns:].tolist()
            ids = [[t for t, keep in zip(row, keep_row) if keep] for row, keep_row in zip(ids, keep_columns)]
        # Rows with tokens in this call (one whose chunk of a chunked prefill is all padding waits).
        active = [b for b, row in enumerate(ids) if row]
        if not active:
            raise ValueError("every row of this input is padding")

        keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
        flat = torch.from_numpy(self._forward_rows([ids[b] for b in active], [cache.rows[b] for b in active],
                                                   cache.rows, active, last_only=keep == 1))
        logits = torch.zeros(batch, 1 if keep == 1 else columns, flat.shape[1])
        start = 0
        for b in active:  # a row's tokens are its last len(row) columns (left padding)
            n = 1 if keep == 1 else len(ids[b])
            logits[b, logits.shape[1] - n:] = flat[start:start + n]
            start += n
        if keep > 1:
            logits = logits[:, -keep:]
        elif not isinstance(logits_to_keep, int):
            logits = logits[:, logits_to_keep]
        cache._columns += columns
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache if use_cache is not False else None)

    def _forward_rows(self, ids, rows, all_rows, active, last_only):
        """The batched forward of ids[i] on rows[i] (= all_rows[active[i]]). Rows that start identical on
        empty caches (generate's copies of one prompt for beams or num_return_sequences) are computed
        once, and the copies' caches become forks of it in all_rows."""
        first = {}
        if not any(row.length for row in rows):
            for i, row in enumerate(ids):
                first.setdefault(tuple(row), i)
        unique = sorted(set(first.values())) if first else list(range(len(ids)))
        if len(unique) == len(ids):
            return self.engine.forward_batch(ids, rows, last_only)
        out = self.engine.forward_batch([ids[i] for i in unique], [rows[i] for i in unique], last_only)
        starts = np.cumsum([0] + [1 if last_only else len(ids[i]) for i in unique])
        parts = []
        for i, row in enumerate(ids):
            source = first[tuple(row)]
            if source != i:
                all_rows[active[i]] = rows[source].fork()
            u = unique.index(source)
            parts.append(out[starts[u]:starts[u + 1]])
        return np.concatenate(parts)


def _load_configs(path):
    """The transformers config and generation config of a checkpoint folder or GGUF file."""
    if path.endswith(".gguf") and os.path.isfile(path):
        folder, extra = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    else:
        folder, extra = path, {}
    config = AutoConfig.from_pretrained(folder, **extra)
    try:
        generation = GenerationConfig.from_pretrained(folder, **extra)
    except OSError:  # no generation_config.json: the model config's defaults, as transformers does
        generation = GenerationConfig.from_model_config(config)
    return config, generation


def _save_weights(hf_model, folder):
    """config.json and model.safetensors of the model as it is in memory. Not save_pretrained, which
    refuses models transformers loaded from GGUF."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous() for name, t in hf_model.state_dict().items()}
    if getattr(hf_model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # the embedding matrix itself, which afm reuses
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    config = hf_model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(hf_model).__name__]  # GGUF configs lack it
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def build_model(hf_model_or_path, device="cpu", max_seq_len=None, weights="f32", threads=None):
    """The bring-up note's build_model: an AfmForCausalLM over afm, from a checkpoint path (an HF
    folder or a GGUF file) or from a transformers model, whose current weights are saved to a
    temporary folder for afm to load (pass a path to skip that copy)."""
    if isinstance(hf_model_or_path, (str, os.PathLike)):
        path = os.fspath(hf_model_or_path)
        config, generation = _load_configs(path)
        engine = afm.build_model(path, device, max_seq_len, weights, threads)
    elif isinstance(hf_model_or_path, PreTrainedModel):
        hf_model = hf_model_or_path
        config, generation = hf_model.config, copy.deepcopy(hf_model.generation_config)
        with tempfile.TemporaryDirectory(prefix="afm-hf-") as folder:
            _save_weights(hf_model, folder)
            engine = afm.build_model(folder, device, max_seq_len, weights, threads)
    else:
        raise TypeError(f"build_model takes a path or a transformers PreTrainedModel, not {type(hf_model_or_path).__name__}")
    model = AfmForCausalLM(config, engine)
    model.generation_config = generation
    return model.eval()
