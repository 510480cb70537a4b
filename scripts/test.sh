#!/usr/bin/env bash
# The whole test suite: install what is missing (torch and transformers included: afm.hf and
# afm.eval are tested against transformers' own models), build, run every test with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --reference
scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)"
