#!/usr/bin/env bash
# Encode speed of afm's tokenizer against the npm @huggingface/tokenizers package, on the same
# paragraphs in the same run, single-threaded, each starting from an empty word cache.
#
#   bench/tokenizer_vs_hf.sh [tokenizer_dir] [corpus.txt]
#
# Uses $BENCH_TOKENIZER (default build/bench_tokenizer); without it, builds one with g++.
# Needs `npm ci --prefix tests/tokenizer_diff`.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/tests/fixtures/tokenizer-llama3}
corpus=${2:-$root/tests/fixtures/corpus/austen.txt}
bench=${BENCH_TOKENIZER:-$root/build/bench_tokenizer}

if [ ! -d "$root/tests/tokenizer_diff/node_modules/@huggingface/tokenizers" ]; then
  echo "the reference package is missing: run npm ci --prefix tests/tokenizer_diff" >&2
  exit 1
fi
if [ ! -x "$bench" ]; then
  bench=$(mktemp -d)/bench_tokenizer
  echo "building $bench" >&2
  g++ -std=c++20 -O2 -DAFM_SOURCE_DIR="\"$root\"" -I"$root/src" "$root/src/tokenizer.cpp" \
    "$root/bench/bench_tokenizer.cpp" -lpcre2-8 -o "$bench"
fi

afm=$("$bench" "$dir" "$corpus")
echo "$afm"
hf=$(node "$root/tests/tokenizer_diff/hf_tokenize.mjs" bench "$dir" "$corpus")
echo "npm @huggingface/tokenizers: $hf"

# Both print "tokens=N seconds=S" last.
read -r afm_tokens afm_seconds < <(echo "$afm" | tail -n 1 | sed 's/tokens=\([0-9]*\) seconds=\([0-9.]*\)/\1 \2/')
read -r hf_tokens hf_seconds < <(echo "$hf" | tail -n 1 | sed 's/tokens=\([0-9]*\) seconds=\([0-9.]*\)/\1 \2/')
if [ "$afm_tokens" != "$hf_tokens" ]; then
  echo "token counts differ: afm $afm_tokens, HF $hf_tokens" >&2
  exit 1
fi
awk -v n="$afm_tokens" -v a="$afm_seconds" -v h="$hf_seconds" 'BEGIN {
  printf "encode %d tokens: afm %.3f s (%.2f M tok/s), HF js %.3f s (%.2f M tok/s): afm is %.1fx faster\n",
         n, a, n / a / 1e6, h, n / h / 1e6, h / a }'
