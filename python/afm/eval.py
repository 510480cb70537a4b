"""The bring-up note's eval, live: transformers' own model generates the reference tokens, then afm
is teacher-forced on them (fed each reference token, never its own choice) and scored as `afm eval`
scores a stored reference: top-1 and top-5 agreement, and the logits' largest relative error.

    python -m afm.eval --model PATH --prompt-file F --max-new-tokens 100 --weights all

Needs torch and transformers for the reference (scripts/install-deps.sh --reference).
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

import afm

__all__ = ["Reference", "hf_reference", "load_hf_model", "teacher_forcing", "main"]

FORMATS = ("f32", "bf16", "bfp8", "bfp4")


@dataclass
class Reference:
    """A prompt, the tokens transformers generated greedily after it, and the float32 logits it
    computed: logits [len(prompt), vocab] of one pass over the prompt, and decode_logits
    [len(generated), vocab], row i being the logits that chose generated[i]."""
    prompt: list
    generated: list
    logits: np.ndarray = None
    decode_logits: np.ndarray = None


def load_hf_model(path):
    """transformers' own model for an HF folder or a GGUF file (dequantized), float32 with eager
    attention: the plain softmax(QK^T)V, with no fused kernel's rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    extra = {}
    if path.endswith(".gguf") and os.path.isfile(path):
        path, extra = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **extra)
    return model.eval()


def hf_reference(hf_model, prompt_ids, max_new_tokens=100):
    """The reference from transformers' model: one pass over the prompt, then greedy one-token steps
    on its KV cache, each taking the argmax of the raw logits. Not generate(), which would apply the
    checkpoint's generation config (eos stopping, repetition penalties): the reference is exactly
    max_new_tokens steps of the model itself."""
    import torch

    ids = torch.tensor([list(prompt_ids)], dtype=torch.int64)
    generated, decode = [], []
    with torch.no_grad():
        out = hf_model(input_ids=ids, use_cache=True)
        prefill = out.logits[0].float().numpy()
        logits, past = out.logits[0, -1], out.past_key_values
        while True:
            generated.append(int(torch.argmax(logits)))  # ties go to the lower id, as afm's eval ranks them
            decode.append(logits.float().numpy())
            if len(generated) == max_new_tokens:
                break
            out = hf_model(input_ids=torch.tensor([generated[-1:]]), past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1], out.past_key_values
    return Reference(list(prompt_ids), generated, np.ascontiguousarray(prefill), np.stack(decode))


def teacher_forcing(model, reference):
    """afm eval's teacher forcing of an afm.Model on a Reference. Returns a dict: prompt_tokens,
    steps, top1, top5 (fractions), top1_misses (steps), prefill_max_rel_err and decode_max_rel_err
    (max over rows of ||afm - ref|| / ||ref||; -1 without reference logits)."""
    return model._model.teacher_forcing(reference.prompt, reference.generated, reference.logits,
                                        reference.decode_logits)


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m afm.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an HF model folder or a GGUF file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", help="the prompt, read verbatim and tokenized with special tokens")
    source.add_argument("--prompt", help="the prompt, given inline")
    p.add_argument("--max-new-tokens", "-n", type=int, default=100, help="reference tokens to score (default 100)")
    p.add_argument("--weights", default="bfp8", help="a format, a comma-separated list, or all (f32,bf16,bfp8,bfp4)")
    p.add_argument("--threads", type=int, default=None, help="afm's threads (default: every core)")
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by format")
    args = p.parse_args(argv)
    args.formats = list(FORMATS) if args.weights == "all" else args.weights.split(",")
    for f in args.formats:
        if f not in FORMATS:
            p.error(f"unknown weight format {f!r} (expected one of {', '.join(FORMATS)} or all)")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return args


def _error_text(err):
    return "n/a" if err < 0 else f"{err:.2e}"


def main(argv=None):
    args = _parse_args(argv)
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8", newline="") as f:  # the bytes as afm eval reads them
            text = f.read()
    else:
        text = args.prompt
    prompt = afm.Tokenizer(args.model).encode(text)
    if not prompt:
        sys.exit("the prompt tokenizes to nothing")
    reference = hf_reference(load_hf_model(args.model), prompt, args.max_new_tokens)
    results = {}
    for fmt in args.formats:
        model = afm.build_model(args.model, weights=fmt, threads=args.threads,
                                max_seq_len=len(prompt) + args.max_new_tokens)
        r = results[fmt] = teacher_forcing(model, reference)
        del model
        if not args.json:
            print(f"{fmt}: {r['prompt_tokens']} prompt tokens, {r['steps']} steps | top-1 {100 * r['top1']:.1f}% | "
                  f"top-5 {100 * r['top5']:.1f}% | prefill err {_error_text(r['prefill_max_rel_err'])} | "
                  f"decode err {_error_text(r['decode_max_rel_err'])}", flush=True)
            if r["top1_misses"]:
                print("  top-1 misses at steps: " + " ".join(map(str, r["top1_misses"])))
    if args.json:
        print(json.dumps({"model": args.model, "formats": results}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except (afm.Error, OSError, ValueError) as e:  # a bad path, file or reference: the message, no traceback
        sys.exit(f"afm.eval: {e}")
