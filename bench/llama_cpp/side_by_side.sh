#!/usr/bin/env bash
# llama.cpp and afm on the same GGUF, one after the other, and a table of afm / llama.cpp.
#
#   bench/llama_cpp/side_by_side.sh /tmp/afm-4.5b-q8_0.gguf [--context 4096]
#
# The afm weight format is the one that matches the file's type in bytes per weight
# (Q8_0 <-> bfp8, Q4_0 <-> bfp4, BF16 <-> bf16); afm converts the tensors to it at load.
# Extra arguments go to run_llama_cpp.py. Env: PY (the llama-cpp-python venv's python), AFM (the
# afm binary; copy it elsewhere if build/ may be relinked during the run), AFM_ARGS (more afm
# bench flags, e.g. "--activations int8"), OUT (folder for the two JSON files). OMP_WAIT_POLICY=PASSIVE stops llama.cpp's OpenMP threads spin-waiting, much faster
# when other jobs share the cores (afm does not use OpenMP).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
model=$1; shift
PY=${PY:-/tmp/llama-venv/bin/python}
AFM=${AFM:-$root/build/afm}
OUT=${OUT:-/tmp/side_by_side.$(basename "$model" .gguf)}
mkdir -p "$OUT"

# The file's type, from general.file_type (llama.cpp's LlamaFileType).
ftype=$("$PY" -c 'import sys, gguf; r = gguf.GGUFReader(sys.argv[1])
print(gguf.LlamaFileType(int(r.fields["general.file_type"].parts[-1][0])).name)' "$model")
case $ftype in
  MOSTLY_Q8_0) weights=bfp8 ;;
  MOSTLY_Q4_0) weights=bfp4 ;;
  MOSTLY_BF16) weights=bf16 ;;
  *) echo "no afm format matches $ftype" >&2; exit 1 ;;
esac

# --context N: llama.cpp decodes after a real N-token prefill, afm's bench after a cache of N random
# keys and values (a step's time depends on the cache length, not on what it holds).
ctx=0
for ((i = 1; i <= $#; i++)); do [[ ${!i} == --context ]] && { j=$((i + 1)); ctx=${!j}; }; done
afm_ctx=0; [[ $ctx != 0 ]] && afm_ctx=0,$ctx

echo "load before llama.cpp: $(uptime)" >&2
"$PY" "$here/run_llama_cpp.py" "$model" "$@" > "$OUT/llama_cpp.json"
echo "load before afm:       $(uptime)" >&2
# shellcheck disable=SC2086  # AFM_ARGS is a list of flags
"$AFM" bench --model "$model" --weights "$weights" --threads 2 --prompt-lens 128,512 --gen 16 --context-lens $afm_ctx \
  ${AFM_ARGS:-} --json > "$OUT/afm.json"
echo "load after both:       $(uptime)" >&2

"$PY" - "$OUT/llama_cpp.json" "$OUT/afm.json" "$ftype" "$weights" "$ctx" <<'EOF'
import json, sys
l, a = (json.load(open(p)) for p in sys.argv[1:3])
rows = [(f"prefill {n} tok/s", l["prefill_tok_per_s"][n], a["prefill_tok_per_s"][n]) for n in ("128", "512")]
rows += [(f"decode ctx {c} tok/s", l["decode"][c]["tok_per_s"], a["decode"][c]["tok_per_s"])
         for c in dict.fromkeys(("0", sys.argv[5]))]
rows += [("load s", l["load_s"], a["load_s"]), ("peak RSS GB", l["rss_GB"], a["rss_GB"])]
print(f"{sys.argv[3]} (llama-cpp-python {l['llama_cpp_python']}, OMP_WAIT_POLICY {l['omp_wait_policy']}) "
      f"vs afm --weights {sys.argv[4]} --activations {a['activations']}, {l['threads']} threads")
print(f"afm: {a['bytes_per_token'] / 1e6:.0f} MB/token, floor {a['floor_tok_per_s']:.2f} tok/s at "
      f"{a['bandwidth_GBps']:.1f} GB/s measured after the runs")
print(f"| {'measure':<22} | {'llama.cpp':>10} | {'afm':>10} | {'afm/llama.cpp':>13} |")
print(f"|{'-' * 24}|{'-' * 12}|{'-' * 12}|{'-' * 15}|")
for name, x, y in rows:
    print(f"| {name:<22} | {x:>10.2f} | {y:>10.2f} | {y / x:>12.2f}x |")
own = {k: round(v["tok_per_s"], 2) for k, v in l["llama_perf"].items()}
print(f"llama.cpp's own counters (llama_perf_context), tok/s: {own}")
print("(tok/s: above 1x means afm is faster; load and RSS: above 1x means afm takes more)")
EOF
