#!/usr/bin/env python3
"""Write a random-weight GGUF of an HF config's shape (AFM-4.5B's by default) that both llama.cpp
and afm load, so the two engines can be timed on the same file.

Architecture `arcee` (AFM-4.5B's own: ReLU² MLP, up and down only) unless `--arch llama` (SwiGLU,
adds ffn_gate). Matrices N(0, 0.02), norms 1, in Q8_0, Q4_0 or BF16 (every matrix, embedding and
output included; norms F32). Tensors are generated, quantized and written a row chunk at a time,
so memory stays at a few hundred MB whatever the model size.

    python make_random_gguf.py --type q8_0 --out /tmp/afm-4.5b-q8_0.gguf
    python make_random_gguf.py --type q8_0 --layers 2 --out /tmp/afm-2l-q8_0.gguf   # quick test
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import gguf
from gguf.quants import quantize, quant_shape_to_byte_shape

ROOT = Path(__file__).resolve().parents[2]
TYPES = {
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
CHUNK_VALUES = 1 << 24  # values generated per chunk: ~64 MB of f32 plus the quantizer's temporaries


def byte_level_alphabet():
    """GPT-2's bytes_to_unicode(): the 256 characters byte-level BPE spells bytes with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tokenizer(w, vocab_size, bos, eos):
    """A made-up gpt2-style BPE vocabulary of vocab_size tokens: the 256 byte tokens (so any text,
    "\\n" included, tokenizes), one merge, filler tokens, and control tokens at the top (the
    config's bos/eos among them). Contents do not matter for speed; llama.cpp and afm both
    require tokens, merges and a known pre-tokenizer."""
    specials = sorted({bos, eos} | set(range(max(bos, eos) + 1, vocab_size)))
    tokens = byte_level_alphabet() + ["ĠĠ"]
    tokens += [f"tok{i}" for i in range(len(tokens), vocab_size)]
    types = [gguf.TokenType.NORMAL] * vocab_size
    for i in specials:
        tokens[i] = f"<|special_{i}|>"
        types[i] = gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")  # Llama 3's split regex; both engines know the name
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)


def tensor_plan(cfg, layers, arch):
    """(name, numpy shape (rows, cols), is_norm) in llama.cpp's order and naming."""
    h, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    plan = [("token_embd.weight", (v, h), False)]
    for i in range(layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (h,), True), (b + "attn_q.weight", (q, h), False),
                 (b + "attn_k.weight", (kv, h), False), (b + "attn_v.weight", (kv, h), False),
                 (b + "attn_output.weight", (h, q), False), (b + "ffn_norm.weight", (h,), True)]
        if arch == "llama":
            plan.append((b + "ffn_gate.weight", (ff, h), False))
        plan += [(b + "ffn_up.weight", (ff, h), False), (b + "ffn_down.weight", (h, ff), False)]
    plan += [("output_norm.weight", (h,), True), ("output.weight", (v, h), False)]
    return plan


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=ROOT / "tests/fixtures/afm-4.5b-config.json")
    ap.add_argument("--type", choices=TYPES, default="q8_0")
    ap.add_argument("--arch", choices=["arcee", "llama"], default="arcee")
    ap.add_argument("--layers", type=int, help="cut the model to N layers (quick tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cfg = json.loads(Path(args.config).read_text())
    layers = args.layers or cfg["num_hidden_layers"]
    qtype, ftype = TYPES[args.type]
    h = cfg["hidden_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    plan = tensor_plan(cfg, layers, args.arch)

    # Matrices' bytes in the chosen type; norms are F32 as llama.cpp's converter writes them.
    def nbytes(shape, norm):
        return 4 * shape[0] if norm else int(np.prod(quant_shape_to_byte_shape(shape, qtype)))
    total = sum(nbytes(s, n) for _, s, n in plan)
    free = os.statvfs(Path(args.out).resolve().parent)
    if free.f_bavail * free.f_frsize < total * 1.05:
        sys.exit(f"not enough free disk for {total / 1e9:.2f} GB at {args.out}")

    tmp = args.out + ".partial"
    w = gguf.GGUFWriter(tmp, args.arch)
    w.add_name(f"random {cfg.get('model_type', 'model')} shape, {layers} layers")
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "yarn":  # AFM-4.5B: YaRN x20 over 4096 positions
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    tokenizer(w, cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])

    for name, shape, norm in plan:
        if norm:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, norm))
        else:
            w.add_tensor_info(name, quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8),
                              nbytes(shape, norm), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # The data section, tensor by tensor in the order of the infos above, each aligned as
    # GGUFWriter.write_tensor_data aligns it, but written a chunk of rows at a time.
    rng = np.random.default_rng(args.seed)
    fout = w.fout[0]
    start = time.time()
    for k, (name, shape, norm) in enumerate(plan):
        w.write_padding(fout, fout.tell())
        if norm:
            np.ones(shape, np.float32).tofile(fout)
        else:
            rows, cols = shape
            step = max(1, CHUNK_VALUES // cols)
            for r in range(0, rows, step):
                n = min(step, rows - r)
                x = rng.standard_normal((n, cols), dtype=np.float32)
                x *= 0.02
                quantize(x, qtype).tofile(fout)
        w.write_padding(fout, nbytes(shape, norm))
        print(f"\r{k + 1}/{len(plan)} tensors, {fout.tell() / 1e9:.2f} GB, {time.time() - start:.0f} s",
              end="", file=sys.stderr, flush=True)
    w.close()
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}: {args.arch}, {layers} layers, {args.type}, {os.path.getsize(args.out)} bytes",
          file=sys.stderr)


if __name__ == "__main__":
    main()
