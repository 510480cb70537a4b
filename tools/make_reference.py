#!/usr/bin/env python3
"""Make an afm reference file from a HuggingFace causal LM (the real AFM-4.5B or any other).

Writes OUT/reference.safetensors and OUT/reference.json in the same layout as the test fixtures
(tests/fixtures/*/reference.*), so that afm can be checked against HF transformers with

    afm eval --model DIR --reference OUT/reference.safetensors
    afm eval --model DIR --prompt-file PROMPT.txt --reference-tokens OUT/reference.safetensors --max-new-tokens 100

Example:
    python3 tools/make_reference.py --model arcee-ai/AFM-4.5B --prompt-file models/afm-tiny-austen/eval_prompt.txt \\
        --prompt "The capital of France is" --max-new-tokens 100 --out ref-afm-4.5b --hidden-states

--model may also be a .gguf file, which transformers dequantizes to float32 (its gguf_file= loading).

See docs/REFERENCE.md. Needs torch, transformers and safetensors (scripts/install-deps.sh --reference).
"""
import argparse
import gzip
import json
import os
import sys

try:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
except ImportError as e:
    sys.exit(f"make_reference.py: {e}.\n"
             "This script needs PyTorch, HF transformers and safetensors:\n"
             "    pip install torch transformers safetensors\n"
             "(see https://pytorch.org for a CUDA build of torch).")

LAYOUT = {
    "prompt.N.ids": "int64 [T] prompt token ids (BOS included where the tokenizer adds it)",
    "prompt.N.logits": "float32 [T, vocab] logits of one full forward pass over the prompt",
    "prompt.N.generated": "int64 [n_new] greedy continuation: one prefill pass, then one-token decode steps that reuse HF's KV cache",
    "prompt.N.decode_logits": "float32 [n_new, vocab] logits that chose each generated token (row 0 = last prompt position)",
    "prompt.N.logit_rows": "int64 [R] with --rows: the prompt positions whose logits and hidden states are kept",
    "prompt.N.decode_rows": "int64 [S] with --rows: the decode steps whose logits are kept",
    "prompt.N.hidden.L": "float32 [T, hidden] HF output_hidden_states[L]: for L < num_hidden_layers the input of layer L (L=0: token embeddings; L>0: output of layer L-1); L = num_hidden_layers: the final RMSNorm output, so logits = hidden.L @ lm_head^T",
    "rope.inv_freq": "float32 [head_dim/2] inverse frequencies after YaRN (or default) initialisation",
}


def parse_args():
    p = argparse.ArgumentParser(description="Make an afm reference.safetensors + reference.json with HF transformers.")
    p.add_argument("--model", required=True, help="HF hub id (e.g. arcee-ai/AFM-4.5B) or a local checkpoint directory")
    p.add_argument("--prompt-file", action="append", default=[], metavar="FILE",
                   help="a prompt read verbatim from FILE (repeatable; no newline stripping, as afm reads it)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt given inline (repeatable)")
    p.add_argument("--chat-file", action="append", default=[], metavar="FILE.json",
                   help="a conversation (JSON list of messages) rendered with the model's chat template and "
                        "add_generation_prompt, tokenized as apply_chat_template does (repeatable; after the other prompts)")
    p.add_argument("--rows", type=int, default=0, metavar="N",
                   help="keep the logits (and hidden states) of only N evenly spaced prompt positions and decode steps "
                        "per prompt, first and last included: a compact reference for a large vocabulary")
    p.add_argument("--save-tokenizer", action="store_true",
                   help="also write OUT/tokenizer.json.gz, the tokenizer transformers built (for a GGUF: from its metadata)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="greedy tokens to generate per prompt (default 100)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if needed)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (default float32: the reference afm's float32 path should match to ~1e-5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    p.add_argument("--hidden-states", action="store_true",
                   help="also save prompt.N.hidden.L for every layer (for afm eval --layers)")
    p.add_argument("--no-logits", action="store_true",
                   help="save only ids + generated (no logits / decode_logits): small file, teacher-forced top-1/top-5 only")
    args = p.parse_args()
    if not args.prompt_file and not args.prompt and not args.chat_file:
        p.error("give at least one --prompt-file FILE, --prompt TEXT or --chat-file FILE")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return args


def source_kwargs(name):
    """from_pretrained's arguments for a hub id, a folder, or a .gguf file (its folder plus gguf_file=)."""
    if name.endswith(".gguf") and os.path.isfile(name):
        return [os.path.dirname(os.path.abspath(name))], {"gguf_file": os.path.basename(name)}
    return [name], {}


def load_model(name, dtype, device):
    # transformers >= 4.56 (and 5.x) calls it `dtype`; older releases only know `torch_dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    args, kwargs = source_kwargs(name)
    # Eager attention: the plain softmax(QK^T)V path, no fused SDPA/flash kernels with their own rounding.
    model = AutoModelForCausalLM.from_pretrained(*args, attn_implementation="eager", **{dtype_kw: dtype}, **kwargs)
    return model.to(device).eval()


def rotary_module(model):
    """The first module holding rotary inverse frequencies (LlamaRotaryEmbedding and friends), or None."""
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return module
    return None


def rope_config(config):
    # transformers 5 keeps everything in `rope_parameters`; v4-style configs have rope_theta + rope_scaling.
    params = getattr(config, "rope_parameters", None)
    rope = dict(params) if isinstance(params, dict) else dict(getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def read_prompts(args, tokenizer):
    """(source, text, ids) per prompt. Plain prompts get the tokenizer's special tokens (BOS where it adds one), as
    afm's generate does; a chat is rendered by the template, which writes its own, so none are added."""
    prompts = []
    for path in args.prompt_file:
        # newline="" keeps CRLF and trailing newlines exactly as afm's --prompt-file sees the bytes.
        with open(path, encoding="utf-8", newline="") as f:
            prompts.append((path, f.read()))
    prompts += [("--prompt", text) for text in args.prompt]
    prompts = [(source, text, tokenizer(text)["input_ids"]) for source, text in prompts]
    for path in args.chat_file:
        with open(path, encoding="utf-8") as f:
            messages = json.load(f)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append((path, text, tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts


def spaced_rows(n, count):
    """`count` evenly spaced indices of range(n), first and last included (all of them when count >= n)."""
    if count >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)}) if count > 1 else [n - 1]


@torch.no_grad()
def greedy_text(model, tokenizer, ids, max_new_tokens):
    """What model.generate does greedily, stopping at the model's eos, decoded without special tokens."""
    out = model.generate(ids[None, :].to(model.device), do_sample=False, max_new_tokens=max_new_tokens,
                         attention_mask=torch.ones(1, ids.numel(), dtype=torch.int64, device=model.device))
    return tokenizer.decode(out[0, ids.numel():].tolist(), skip_special_tokens=True)


@torch.no_grad()
def run_prompt(model, ids, max_new_tokens, want_logits, want_hidden):
    """One prefill pass (its logits are prompt.N.logits), then greedy one-token decode steps on HF's KV cache."""
    input_ids = ids[None, :].to(model.device)
    out = model(input_ids=input_ids, use_cache=True, output_hidden_states=want_hidden)
    result = {}
    if want_logits:
        result["logits"] = out.logits[0].float().cpu()
    if want_hidden:
        # HF gives num_hidden_layers + 1 states; the last one is already after the final norm.
        result["hidden"] = [h[0].float().cpu() for h in out.hidden_states]
        n_layers = model.config.num_hidden_layers
        if len(result["hidden"]) != n_layers + 1:
            print(f"warning: got {len(result['hidden'])} hidden states for {n_layers} layers", file=sys.stderr)

    generated, decode_logits = [], []
    # clone() so that `del out` really frees the [T, vocab] prefill logits (and hidden states) on the device.
    step_logits, past = out.logits[0, -1].clone(), out.past_key_values
    del out
    for i in range(max_new_tokens):
        # torch.argmax takes the lowest id on ties, the same rule afm's eval uses.
        token = int(torch.argmax(step_logits))
        generated.append(token)
        if want_logits:
            decode_logits.append(step_logits.float().cpu())
        if i + 1 == max_new_tokens:
            break
        # Positions come from the cache length (cache_position), exactly as in model.generate.
        step = model(input_ids=torch.tensor([[token]], device=model.device), past_key_values=past, use_cache=True)
        step_logits, past = step.logits[0, -1], step.past_key_values
    # Generation ignores EOS on purpose: a fixed n_new keeps every prompt's teacher-forced steps comparable.
    result["generated"] = torch.tensor(generated, dtype=torch.int64)
    if want_logits:
        result["decode_logits"] = torch.stack(decode_logits)
    return result


def gguf_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")
    except PackageNotFoundError:
        return None


def main():
    args = parse_args()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    # The checkpoint's own dtype, read before loading (from_pretrained may overwrite it with the compute dtype).
    source_args, source_extra = source_kwargs(args.model)
    file_config = AutoConfig.from_pretrained(*source_args, **source_extra)
    ckpt_dtype = getattr(file_config, "dtype", None) or getattr(file_config, "torch_dtype", None) or "unknown"
    ckpt_dtype = "GGUF " + source_extra["gguf_file"] if source_extra else str(ckpt_dtype).replace("torch.", "")
    tokenizer = AutoTokenizer.from_pretrained(*source_args, **source_extra)
    model = load_model(args.model, dtype, args.device)
    config = model.config

    tensors, prompt_info = {}, []
    for n, (source, text, ids) in enumerate(read_prompts(args, tokenizer)):
        ids = torch.tensor(ids, dtype=torch.int64)
        if ids.numel() == 0:
            sys.exit(f"prompt {n} ({source}) tokenizes to nothing")
        r = run_prompt(model, ids, args.max_new_tokens, not args.no_logits, args.hidden_states)
        p = f"prompt.{n}."
        tensors[p + "ids"] = ids
        tensors[p + "generated"] = r["generated"]
        prompt_rows, decode_rows = list(range(ids.numel())), list(range(args.max_new_tokens))
        if args.rows:
            prompt_rows, decode_rows = spaced_rows(ids.numel(), args.rows), spaced_rows(args.max_new_tokens, args.rows)
            tensors[p + "logit_rows"] = torch.tensor(prompt_rows, dtype=torch.int64)
            tensors[p + "decode_rows"] = torch.tensor(decode_rows, dtype=torch.int64)
        if not args.no_logits:
            tensors[p + "logits"] = r["logits"][prompt_rows]
            tensors[p + "decode_logits"] = r["decode_logits"][decode_rows]
        for layer, h in enumerate(r.get("hidden", [])):
            tensors[p + f"hidden.{layer}"] = h[prompt_rows]
        prompt_info.append({"index": n, "n_tokens": int(ids.numel()), "n_generated": len(r["generated"]),
                            "source": source, "text": text,
                            "generated_text": tokenizer.decode(r["generated"].tolist(), skip_special_tokens=False),
                            "greedy_text": greedy_text(model, tokenizer, ids, args.max_new_tokens)})
        print(f"prompt {n}: {ids.numel()} tokens -> {len(r['generated'])} generated: "
              f"{prompt_info[-1]['generated_text'][:80]!r}", file=sys.stderr)

    rotary = rotary_module(model)
    if rotary is not None:
        tensors["rope.inv_freq"] = rotary.inv_freq.float().cpu()

    try:
        import tokenizers
        tokenizers_version = tokenizers.__version__
    except ImportError:
        tokenizers_version = None
    scaling = getattr(rotary, "attention_scaling", None) if rotary is not None else None
    sidecar = {
        "model_dir": args.model,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers_version,
                     "gguf": gguf_version()},
        "prompts": prompt_info,
        "compute": f"{args.dtype} from the {ckpt_dtype} checkpoint, eager attention, on {args.device}"
                   + (", greedy_text from model.generate (stops at eos)" if prompt_info else ""),
        "rope_attention_scaling": float(scaling) if scaling is not None else None,
        "rope_config": rope_config(config),
        "layout": {k: v for k, v in LAYOUT.items()
                   if not (args.no_logits and "logits" in k) and (args.hidden_states or "hidden" not in k)
                   and (rotary is not None or not k.startswith("rope.")) and (args.rows or "_rows" not in k)},
    }

    os.makedirs(args.out, exist_ok=True)
    if args.save_tokenizer:
        # gzip (with no timestamp, so the same tokenizer gives the same bytes): a 49k vocabulary is 3.5 MB as text.
        with gzip.GzipFile(os.path.join(args.out, "tokenizer.json.gz"), "wb", mtime=0) as f:
            f.write(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    # save_file wants contiguous tensors that share no storage: clone each one.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
              os.path.join(args.out, "reference.safetensors"))
    with open(os.path.join(args.out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=1, ensure_ascii=False, default=str)
        f.write("\n")
    print(f"wrote {args.out}/reference.safetensors ({len(tensors)} tensors) and {args.out}/reference.json", file=sys.stderr)


if __name__ == "__main__":
    main()
