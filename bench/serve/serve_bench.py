#!/usr/bin/env python3
"""Throughput and latency of `afm serve` under concurrent streaming clients.

Starts the server, then for each concurrency C sends C streaming completions at once (distinct
prompts, greedy, --gen tokens each) and reports total generated tokens/s (all clients' tokens over
the wall time of the round), TTFT p50/p99 (request sent -> first streamed chunk), and the
prefix-cache speed-up: the TTFT of a request whose --prefix-tokens-token system prompt is cached
against the same request cold. Standard library only.

    bench/serve/serve_bench.py --afm build/afm [--model DIR] [--weights bfp8] [--activations int8] \
        [--concurrency 1,4,16,32] [--gen 32] [--prompt-tokens 32] [--prefix-tokens 1000] [--json]

--synthetic-tokenizer makes a model folder without a tokenizer usable (a random checkpoint of
AFM-4.5B's shape from `afm init`): it serves a copy of the folder (symlinks) with the embedded
model's tokenizer padded to the config's vocabulary.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be ")


def synthetic_tokenizer_folder(model_dir):
    """A folder of symlinks to model_dir's files plus the embedded tokenizer padded to its vocabulary."""
    vocab_size = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    out = tempfile.mkdtemp(prefix="afm-serve-bench-")
    for name in os.listdir(model_dir):
        os.symlink(os.path.join(os.path.abspath(model_dir), name), os.path.join(out, name))
    tokenizer = json.load(open(os.path.join(ROOT, "models/afm-tiny-austen/tokenizer.json")))
    vocab = tokenizer["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in tokenizer["added_tokens"]}
    for i in range(vocab_size):  # tokens no merge produces; they decode to their own spelling
        if i not in used:
            vocab[f"Ġt{i}"] = i
    json.dump(tokenizer, open(os.path.join(out, "tokenizer.json"), "w"))
    return out


def post(port, path, body, stream=False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def tokenize(port, text):
    conn, res = post(port, "/tokenize", {"content": text})
    tokens = json.loads(res.read())["tokens"]
    conn.close()
    return tokens


def stream_completion(port, prompt, gen, result):
    """Streams one greedy completion; result gets ttft_s, e2e_s and completion_tokens."""
    start = time.perf_counter()
    conn, res = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": True,
                                               "stream_options": {"include_usage": True}})
    if res.status != 200:
        raise RuntimeError(f"HTTP {res.status}: {res.read()[:300]}")
    ttft = None
    for line in res:
        if not line.startswith(b"data: "):
            continue
        if ttft is None:
            ttft = time.perf_counter() - start
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if chunk.get("usage"):
            result["completion_tokens"] = chunk["usage"]["completion_tokens"]
    result["ttft_s"], result["e2e_s"] = ttft, time.perf_counter() - start
    conn.close()


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run_round(port, prompts, gen):
    results = [{} for _ in prompts]
    threads = [threading.Thread(target=stream_completion, args=(port, p, gen, r)) for p, r in zip(prompts, results)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["completion_tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results]
    return {"clients": len(prompts), "generated_tokens": tokens, "wall_s": wall, "total_tok_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--afm", default=os.path.join(ROOT, "build/afm"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/afm-tiny-austen"))
    ap.add_argument("--weights", default="bfp8")
    ap.add_argument("--activations", default="bf16", choices=["bf16", "int8"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--synthetic-tokenizer", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    model = synthetic_tokenizer_folder(args.model) if args.synthetic_tokenizer else args.model

    ctx = max(2048, args.prefix_tokens + args.prompt_tokens + args.gen + 64)
    cmd = [args.afm, "serve", "--port", "0", "--model", model, "--weights", args.weights,
           "--activations", args.activations, "--max-batch", str(max(levels)),
           "--max-queue", str(max(levels)), "--ctx", str(ctx)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        if "listening on" not in line:
            sys.exit(f"the server did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        base = tokenize(port, TEXT * 40)
        report = {"model": args.model, "weights": args.weights, "activations": args.activations, "gen": args.gen, "prompt_tokens": args.prompt_tokens,
                  "concurrency": {}}
        stream_completion(port, base[: args.prompt_tokens], 2, {})  # warm-up
        round_index = 0
        for c in levels:
            # Distinct prompts: each starts at its own offset into the text, so no two share a block.
            prompts = []
            for i in range(c):
                start = (round_index * 97 + i * 31) % (len(base) - args.prompt_tokens)
                prompts.append(base[start : start + args.prompt_tokens])
            round_index += 1
            report["concurrency"][str(c)] = r = run_round(port, prompts, args.gen)
            print(f"concurrency {c:3d}: {r['total_tok_per_s']:7.2f} tok/s total, TTFT p50 {r['ttft_p50_s'] * 1e3:8.1f} ms, "
                  f"p99 {r['ttft_p99_s'] * 1e3:8.1f} ms", file=sys.stderr)
        one = report["concurrency"].get("1")
        if one:
            report["speedup_over_concurrency_1"] = {k: v["total_tok_per_s"] / one["total_tok_per_s"]
                                                    for k, v in report["concurrency"].items()}

        # Prefix cache: the same long system prompt twice with different endings, one token each.
        prefix = tokenize(port, ("System: " + TEXT * 60))[: args.prefix_tokens]
        cold, warm = {}, {}
        stream_completion(port, prefix + base[:8], 1, cold)
        stream_completion(port, prefix + base[8:16], 1, warm)
        report["prefix_cache"] = {"prefix_tokens": len(prefix), "cold_ttft_s": cold["ttft_s"], "warm_ttft_s": warm["ttft_s"],
                                  "speedup": cold["ttft_s"] / warm["ttft_s"]}
        print(f"prefix cache, {len(prefix)}-token system prompt: TTFT cold {cold['ttft_s'] * 1e3:.1f} ms, warm "
              f"{warm['ttft_s'] * 1e3:.1f} ms ({report['prefix_cache']['speedup']:.1f}x)", file=sys.stderr)
        if args.json:
            print(json.dumps(report, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=600)


if __name__ == "__main__":
    main()
