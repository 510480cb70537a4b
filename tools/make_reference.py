#!/usr/bin/env python3
"""Make an afm reference file from a HuggingFace causal LM (the real AFM-4.5B or any other).

Writes OUT/reference.safetensors and OUT/reference.json in the same layout as the test fixtures
(tests/fixtures/*/reference.*), so that afm can be checked against HF transformers with

    afm eval --model DIR --reference OUT/reference.safetensors
    afm eval --model DIR --prompt-file PROMPT.txt --reference-tokens OUT/reference.safetensors --max-new-tokens 100

Example:
    python3 tools/make_reference.py --model arcee-ai/AFM-4.5B --prompt-file models/afm-tiny-austen/eval_prompt.txt \\
        --prompt "The capital of France is" --max-new-tokens 100 --out ref-afm-4.5b --hidden-states

See docs/REFERENCE.md. Needs torch, transformers and safetensors (pip install torch transformers safetensors).
"""
import argparse
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
    "prompt.0.hidden.L": "float32 [T, hidden] HF output_hidden_states[L]: for L < num_hidden_layers the input of layer L (L=0: token embeddings; L>0: output of layer L-1); L = num_hidden_layers: the final RMSNorm output, so logits = hidden.L @ lm_head^T",
    "rope.inv_freq": "float32 [head_dim/2] inverse frequencies after YaRN (or default) initialisation",
}


def parse_args():
    p = argparse.ArgumentParser(description="Make an afm reference.safetensors + reference.json with HF transformers.")
    p.add_argument("--model", required=True, help="HF hub id (e.g. arcee-ai/AFM-4.5B) or a local checkpoint directory")
    p.add_argument("--prompt-file", action="append", default=[], metavar="FILE",
                   help="a prompt read verbatim from FILE (repeatable; no newline stripping, as afm reads it)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt given inline (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="greedy tokens to generate per prompt (default 100)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if needed)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (default float32: the reference afm's float32 path should match to ~1e-5)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    p.add_argument("--hidden-states", action="store_true",
                   help="also save prompt.0.hidden.L for every layer (for afm eval --layers)")
    p.add_argument("--no-logits", action="store_true",
                   help="save only ids + generated (no logits / decode_logits): small file, teacher-forced top-1/top-5 only")
    args = p.parse_args()
    if not args.prompt_file and not args.prompt:
        p.error("give at least one --prompt-file FILE or --prompt TEXT")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return args


def load_model(name, dtype, device):
    # transformers >= 4.56 (and 5.x) calls it `dtype`; older releases only know `torch_dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    # Eager attention: the plain softmax(QK^T)V path, no fused SDPA/flash kernels with their own rounding.
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="eager", **{dtype_kw: dtype})
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


def read_prompts(args):
    prompts = []
    for path in args.prompt_file:
        # newline="" keeps CRLF and trailing newlines exactly as afm's --prompt-file sees the bytes.
        with open(path, encoding="utf-8", newline="") as f:
            prompts.append((path, f.read()))
    prompts += [("--prompt", text) for text in args.prompt]
    return prompts


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


def main():
    args = parse_args()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    # The checkpoint's own dtype, read before loading (from_pretrained may overwrite it with the compute dtype).
    file_config = AutoConfig.from_pretrained(args.model)
    ckpt_dtype = getattr(file_config, "dtype", None) or getattr(file_config, "torch_dtype", None) or "unknown"
    ckpt_dtype = str(ckpt_dtype).replace("torch.", "")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, dtype, args.device)
    config = model.config

    tensors, prompt_info = {}, []
    for n, (source, text) in enumerate(read_prompts(args)):
        # Default add_special_tokens=True: BOS is included exactly as the tokenizer adds it (afm does the same).
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
        if ids.numel() == 0:
            sys.exit(f"prompt {n} ({source}) tokenizes to nothing")
        r = run_prompt(model, ids, args.max_new_tokens, not args.no_logits, args.hidden_states and n == 0)
        tensors[f"prompt.{n}.ids"] = ids
        tensors[f"prompt.{n}.generated"] = r["generated"]
        if not args.no_logits:
            tensors[f"prompt.{n}.logits"] = r["logits"]
            tensors[f"prompt.{n}.decode_logits"] = r["decode_logits"]
        for layer, h in enumerate(r.get("hidden", [])):
            tensors[f"prompt.0.hidden.{layer}"] = h
        prompt_info.append({"index": n, "n_tokens": int(ids.numel()), "n_generated": len(r["generated"]),
                            "source": source,
                            "generated_text": tokenizer.decode(r["generated"].tolist(), skip_special_tokens=False)})
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
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers_version},
        "prompts": prompt_info,
        "compute": f"{args.dtype} from the {ckpt_dtype} checkpoint, eager attention, on {args.device}",
        "rope_attention_scaling": float(scaling) if scaling is not None else None,
        "rope_config": rope_config(config),
        "layout": {k: v for k, v in LAYOUT.items()
                   if not (args.no_logits and "logits" in k) and (args.hidden_states or "hidden" not in k)
                   and (rotary is not None or not k.startswith("rope."))},
    }

    os.makedirs(args.out, exist_ok=True)
    # save_file wants contiguous tensors that share no storage: clone each one.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
              os.path.join(args.out, "reference.safetensors"))
    with open(os.path.join(args.out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=1, ensure_ascii=False, default=str)
        f.write("\n")
    print(f"wrote {args.out}/reference.safetensors ({len(tensors)} tensors) and {args.out}/reference.json", file=sys.stderr)


if __name__ == "__main__":
    main()
