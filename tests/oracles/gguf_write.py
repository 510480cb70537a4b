"""GGUF files written by llama.cpp's own Python writer (the gguf package), for afm's GGUF tests.

    gguf_write.py all-types OUT.gguf
        One tensor of every type afm reads and a metadata value of every type. Beside it:
        OUT.gguf.json (the metadata and tensor list as gguf wrote them) and OUT.gguf.f32 (each
        tensor dequantized by gguf.quants.dequantize, concatenated in file order).
    gguf_write.py from-hf HF_DIR OUT.gguf
        An HF checkpoint folder (F32/BF16 safetensors of a Llama or Arcee model, ByteLevel BPE
        tokenizer.json) converted the way llama.cpp's convert_hf_to_gguf.py lays it out: its tensor
        names, q/k rows permuted for its RoPE, Llama 3 scaling as a rope_freqs tensor, F32 data.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# Byte offsets of the f16 scale fields in each k-quant block (ggml-common.h), set to finite values
# so that random blocks dequantize to numbers.
K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# And of the legacy blocks' d (and m).
LEGACY_SCALE_OFFSETS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,)}


def random_blocks(qtype, n_blocks, rng):
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in {**K_SCALE_OFFSETS, **LEGACY_SCALE_OFFSETS}[qtype]:
        scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


def all_types(out):
    rng = np.random.default_rng(7)
    writer = GGUFWriter(out, "llama")
    metadata = {
        "test.u8": (200, GGUFValueType.UINT8), "test.i8": (-100, GGUFValueType.INT8),
        "test.u16": (60000, GGUFValueType.UINT16), "test.i16": (-30000, GGUFValueType.INT16),
        "test.u32": (4000000000, GGUFValueType.UINT32), "test.i32": (-2000000000, GGUFValueType.INT32),
        "test.u64": (2**62 + 5, GGUFValueType.UINT64), "test.i64": (-2**62, GGUFValueType.INT64),
        "test.f32": (0.1, GGUFValueType.FLOAT32), "test.f64": (0.1, GGUFValueType.FLOAT64),
        "test.true": (True, GGUFValueType.BOOL), "test.false": (False, GGUFValueType.BOOL),
        "test.string": ("h\u00e9llo \u4e16\u754c \U0001f600", GGUFValueType.STRING),
    }
    for key, (value, vtype) in metadata.items():
        writer.add_key_value(key, value, vtype)
    writer.add_array("test.strings", ["a", "", "\u00fc\u00df"])
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.nested", [[1, 2], [3]])

    tensors, expected = [], []
    rows, cols = 3, 512
    for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
                  Q.Q6_K):
        name = f"tensor.{qtype.name}"
        if qtype in (Q.F32, Q.F16):
            data = rng.standard_normal((rows, cols)).astype(np.float32 if qtype == Q.F32 else np.float16)
            writer.add_tensor(name, data)
            values = data.astype(np.float32)
        else:
            if qtype == Q.BF16:
                raw = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
                raw = raw.view(np.uint8).reshape(rows, cols * 2)
            else:
                block_values, block_bytes = GGML_QUANT_SIZES[qtype]
                raw = random_blocks(qtype, rows * cols // block_values, rng).reshape(rows, -1)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            values = dequantize(raw, qtype).reshape(rows, cols)
        expected.append(values.astype(np.float32))
        tensors.append({"name": name, "type": qtype.name, "shape": [rows, cols]})

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    described = {key: value for key, (value, _) in metadata.items()}
    described["test.f32"] = float(np.float32(0.1))
    described.update({"test.strings": ["a", "", "\u00fc\u00df"], "test.ints": [1, -2, 3], "test.nested": [[1, 2], [3]]})
    Path(out + ".json").write_text(json.dumps({"metadata": described, "tensors": tensors}, ensure_ascii=False))
    np.concatenate([e.ravel() for e in expected]).tofile(out + ".f32")


def read_safetensors(folder):
    """Every tensor of an HF folder as float32 numpy arrays (single file or shards)."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        if path.name == "reference.safetensors":
            continue
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            raw = data[8 + header_len + start:8 + header_len + end]
            if info["dtype"] == "BF16":
                values = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] == "F32":
                values = np.frombuffer(raw, np.float32)
            else:
                raise SystemExit(f"{path}: dtype {info['dtype']} not handled")
            tensors[name] = values.reshape(info["shape"]).copy()
    return tensors


def permute(weights, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rotary halves interleaved."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def llama3_rope_factors(rope, head_dim):
    """convert_hf_to_gguf.py's rope_freqs for Llama 3 scaling: one divisor per rotary pair."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def from_hf(folder, out):
    config = json.loads((Path(folder) / "config.json").read_text())
    arch = {"LlamaForCausalLM": "llama", "ArceeForCausalLM": "arcee"}[config["architectures"][0]]
    rope = config.get("rope_parameters") or dict(config.get("rope_scaling") or {}, rope_theta=config["rope_theta"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", config["hidden_size"] // heads)

    writer = GGUFWriter(out, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "yarn":
        from gguf.constants import RopeScalingType
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        # Written only when the config sets them, as convert_hf_to_gguf.py does for models that do.
        for hf_key, gguf_key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                                 ("attention_factor", "attn_factor")):
            if rope.get(hf_key) is not None:
                writer.add_key_value(f"{arch}.rope.scaling.{gguf_key}", rope[hf_key], GGUFValueType.FLOAT32)

    tokenizer = json.loads((Path(folder) / "tokenizer.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab.update(special)
    tokens = [None] * config["vocab_size"]
    for token, index in vocab.items():
        tokens[index] = token
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])

    layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for name, values in read_safetensors(folder).items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            part, suffix = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{layer_names[part]}.{suffix}"
            if part == "self_attn.q_proj":
                values = permute(values, heads)
            elif part == "self_attn.k_proj":
                values = permute(values, kv_heads)
        writer.add_tensor(gguf_name, values)
    if rope_type == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "all-types":
        all_types(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "from-hf":
        from_hf(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
