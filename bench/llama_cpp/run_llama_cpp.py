#!/usr/bin/env python3
"""Time llama.cpp (through llama-cpp-python) on a GGUF the way `afm bench` times afm, and print one
JSON object.

- prefill: `eval` of L random token ids into an empty cache (logits of the last position only);
- decode: `--gen` single-token evals after a cache of `context` positions (0, and with
  `--context 4096` after a real 4096-token prefill: llama.cpp's cache cannot be filled with random
  keys as afm's bench fills its own, so that prefill is done, and timed, too);
- after a warm-up that is not timed (first touch of the mapped weights, threads started), each
  measurement is the median of up to 3 runs, repeated while the runs so far took under 10 s in
  all (afm bench's rule), so cheap ones are steadied and expensive ones run once;
- llama.cpp's own counters (llama_perf_context) over the same calls are reported as a cross-check.

    /tmp/llama-venv/bin/python run_llama_cpp.py /tmp/afm-4.5b-q8_0.gguf [--context 4096]
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-lens", default="128,512")
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--context", type=int, default=0, help="also decode after a prefill of this many tokens")
    ap.add_argument("--flash-attn", action="store_true", help="llama-cpp-python's default is off")
    args = ap.parse_args()
    prompt_lens = [int(n) for n in args.prompt_lens.split(",")]

    start = time.perf_counter()
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=max(4608, args.context + args.gen), n_batch=512, logits_all=False,
                flash_attn=args.flash_attn, verbose=False)
    load_s = time.perf_counter() - start
    ctx = llm._ctx.ctx  # the llama_context, for llama.cpp's own timings
    rng = np.random.default_rng(7)

    def tokens(n):
        return rng.integers(0, llm.n_vocab(), n).tolist()

    # Each eval is followed by llama_synchronize, as reading the logits would be in generation: it
    # waits for the computation (in case a backend runs it asynchronously) and is where llama.cpp
    # adds the call to its own counters (single-token calls as eval, longer ones as prompt eval).
    def prefill(n):
        llm.reset()
        prompt = tokens(n)
        t = time.perf_counter()
        llm.eval(prompt)
        llama_cpp.llama_synchronize(ctx)
        return time.perf_counter() - t

    def decode(gen):  # after whatever the cache holds
        steps = tokens(gen)
        t = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
            llama_cpp.llama_synchronize(ctx)
        return time.perf_counter() - t

    def median_of_runs(timed):
        runs = []
        while len(runs) < 3 and (not runs or sum(runs) < 10):
            runs.append(timed())
        return statistics.median(runs), len(runs)

    def perf():  # llama.cpp's counters since the last reset: prompt (batch > 1) and single-token evals
        p = llama_cpp.llama_perf_context(ctx)
        return {"prompt_tokens": p.n_p_eval, "prompt_ms": p.t_p_eval_ms, "eval_tokens": p.n_eval, "eval_ms": p.t_eval_ms}

    prefill(min(prompt_lens + [16]))  # warm-up, not timed
    decode(2)

    out = {"engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "model": args.model,
           "threads": args.threads,
           # llama.cpp's threads are OpenMP's here: its default spin-waiting is slow when other
           # jobs share the cores, OMP_WAIT_POLICY=PASSIVE makes them sleep instead
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "flash_attn": args.flash_attn, "n_ctx": llm.n_ctx(), "n_batch": llm.n_batch,
           "load_s": load_s, "system_info": llama_cpp.llama_print_system_info().decode().strip(),
           "prefill_tok_per_s": {}, "prefill_runs": {}, "decode": {}, "llama_perf": {}}
    for n in prompt_lens:
        llama_cpp.llama_perf_context_reset(ctx)
        seconds, runs = median_of_runs(lambda: prefill(n))
        p = perf()
        out["prefill_tok_per_s"][str(n)] = n / seconds
        out["prefill_runs"][str(n)] = runs
        out["llama_perf"][f"prefill_{n}"] = {**p, "tok_per_s": 1e3 * p["prompt_tokens"] / p["prompt_ms"]}
        print(f"prefill {n}: {n / seconds:.2f} tok/s ({runs} runs)", file=sys.stderr)

    contexts = [0] + ([args.context] if args.context else [])
    for c in contexts:
        def run():
            if c:  # the prefill that fills the cache, timed as a prefill of c tokens
                out["prefill_tok_per_s"][str(c)] = c / prefill(c)
            else:
                llm.reset()
            llama_cpp.llama_perf_context_reset(ctx)
            return decode(args.gen)
        seconds, runs = median_of_runs(run) if c == 0 else (run(), 1)
        p = perf()  # of the last run only (reset inside run)
        out["decode"][str(c)] = {"tok_per_s": args.gen / seconds, "runs": runs}
        out["llama_perf"][f"decode_{c}"] = {**p, "tok_per_s": 1e3 * p["eval_tokens"] / p["eval_ms"]}
        print(f"decode at context {c}: {args.gen / seconds:.2f} tok/s ({runs} runs)", file=sys.stderr)

    out["decode_tok_per_s"] = out["decode"]["0"]["tok_per_s"]
    out["rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
