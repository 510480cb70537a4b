#!/usr/bin/env bash
# From a fresh Debian machine to text: install what is missing, build, check the embedded model
# against HF transformers, let it write, then chat with a real pretrained model (SmolLM2, GGUF).
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
echo
echo "== afm template + chat: SmolLM2-135M-Instruct, a real pretrained model (its GGUF from PyPI), greedy"
echo '[{"role": "user", "content": "What is the capital of France?"}]' > build/demo-messages.json
build/afm template --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf --messages build/demo-messages.json --add-generation-prompt
echo
echo "What is the capital of France?" |
  build/afm chat --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf --temperature 0 --max-new-tokens 60
