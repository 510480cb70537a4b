#!/usr/bin/env bash
# From a fresh Debian machine to text: install what is missing, build, check the embedded model
# against HF transformers, then let it write.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
echo
echo "== afm eval: the embedded model against HF transformers' reference (teacher forcing)"
build/afm eval --weights f32,bfp8 --reference tests/fixtures/afm-tiny-austen-reference/reference.safetensors
echo
echo "== afm generate: the embedded model, seed 42"
build/afm generate --prompt "It is a truth universally acknowledged, that" --seed 42 --max-new-tokens 80
