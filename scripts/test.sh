#!/usr/bin/env bash
# The whole test suite: install what is missing (torch and transformers included: afm.hf and
# afm.eval are tested against transformers' own models), build, run every test with ctest, then
# replay the fuzzing seeds through the parsers under the sanitizers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --reference
scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)"
# The sanitizers' part of CI (scripts/sanitize.sh runs the whole suite under them): every parser
# of untrusted input, under ASan and UBSan, on each committed fuzzing seed.
scripts/fuzz.sh --replay
