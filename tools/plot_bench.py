#!/usr/bin/env python3
"""Plot `afm bench --json` results: prefill and decode tokens/s per weight format, each against
the ceiling bench measured in the same run (the f32 FMA peak for prefill, the memory-bandwidth
floor for decode), so runs from a noisy machine stay comparable.

    .venv/bin/python tools/plot_bench.py OUT.png bench-bf16.json bench-bfp8.json bench-bfp4.json

Needs matplotlib (scripts/install-deps.sh --bench).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def main(out_path, paths):
    runs = [json.load(open(p)) for p in paths]
    fig, (prefill_ax, decode_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        label = r["weights"]
        lens = sorted(r["prefill_tok_per_s"], key=int)
        xs = [j + i * width for j in range(len(lens))]
        tok = [r["prefill_tok_per_s"][n] for n in lens]
        # The f32 FMA ceiling in tokens/s at each length, from this run's own FLOP count and peak.
        ceiling = [t * 100 / r["prefill_pct_of_peak"][n] for t, n in zip(tok, lens)]
        bars = prefill_ax.bar(xs, tok, width, label=label)
        prefill_ax.scatter(xs, ceiling, marker="_", s=300, color=bars.patches[0].get_facecolor())
        for x, t, n in zip(xs, tok, lens):
            prefill_ax.annotate(f"{r['prefill_pct_of_peak'][n]:.0f}%", (x, t), ha="center", va="bottom", fontsize=7)

        contexts = sorted(r["decode"], key=int)
        xs = [j + i * width for j in range(len(contexts))]
        tok = [r["decode"][c]["tok_per_s"] for c in contexts]
        floor = [r["decode"][c]["floor_tok_per_s"] for c in contexts]
        bars = decode_ax.bar(xs, tok, width, label=label)
        decode_ax.scatter(xs, floor, marker="_", s=300, color=bars.patches[0].get_facecolor())
        for x, t, c in zip(xs, tok, contexts):
            decode_ax.annotate(f"{r['decode'][c]['pct_of_floor']:.0f}%", (x, t), ha="center", va="bottom", fontsize=7)
    lens = sorted(runs[0]["prefill_tok_per_s"], key=int)
    contexts = sorted(runs[0]["decode"], key=int)
    centre = (len(runs) - 1) * width / 2
    prefill_ax.set_xticks([j + centre for j in range(len(lens))], [f"prompt {n}" for n in lens])
    decode_ax.set_xticks([j + centre for j in range(len(contexts))], [f"context {c}" for c in contexts])
    prefill_ax.set_title("prefill tok/s (bar), f32 FMA ceiling (dash), % of it")
    decode_ax.set_title("decode tok/s (bar), bandwidth floor (dash), % of it")
    for ax in (prefill_ax, decode_ax):
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=8)
    r = runs[0]
    fig.suptitle(f"afm on {r['architecture']} ({r['model']}), {r['threads']} threads, kernels {r['kernel_isa']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
