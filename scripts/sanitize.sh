#!/usr/bin/env bash
# The test suite under AddressSanitizer (with LeakSanitizer) and UndefinedBehaviorSanitizer, built
# with clang into build-asan/. Any report fails the test that triggered it.
#   scripts/sanitize.sh            the whole suite (docs/SECURITY.md records its result)
#   scripts/sanitize.sh REGEX      only the CTest entries matching REGEX (CI runs a part this way)
# The Python extension is left out: an ASan runtime inside a stock Python needs LD_PRELOAD.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
CXX=clang++-14 cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="" -DAFM_BUILD_PYTHON=OFF -DAFM_BUILD_BENCH=OFF >/dev/null
cmake --build build-asan -j"$(nproc)"
# halt_on_error: the first report ends the process, so the test fails; detect_leaks is LSan.
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export AFM_SANITIZED=1  # tests/server: longer time limits, and no RSS bound (ASan's quarantine holds freed memory)
# Not hostile_inputs_in_1GB: ASan's shadow memory needs far more address space than its ulimit.
ctest --test-dir build-asan --output-on-failure -j"$(nproc)" --timeout 1500 -E hostile_inputs_in_1GB ${1:+-R "$1"}
