#!/usr/bin/env bash
# Builds the libFuzzer harnesses (fuzz/fuzz_*.cpp) with clang 14, ASan and UBSan, then runs each
# for SECONDS (default 60) on a copy of its committed seeds (fuzz/corpus/<name>/), so the inputs
# it discovers stay out of the repository. Exits non-zero when any harness finds a crash, a
# sanitizer report, a leak, an input over the memory limit or a timeout; the input that triggered
# it lands in build-fuzz/findings/<name>/.
#
#   scripts/fuzz.sh [SECONDS]
#   scripts/fuzz.sh --replay     only runs every committed seed once through its harness (what
#                                scripts/test.sh does: the parsers under the sanitizers on the
#                                fixtures and every bad input found so far)
#
# Then the running server's HTTP API is fuzzed with schemathesis against src/server/openapi.json
# (tests/server/test_schemathesis.py, AFM_SCHEMATHESIS_EXAMPLES per operation, default 500 here
# and 25 in the test suite), using the release build's afm (scripts/build.sh makes it).
#
# Per harness, optional: fuzz/<name>.dict (a libFuzzer dictionary) and a line
# `// fuzz.sh flags: -max_len=N ...` in its source for extra libFuzzer flags.
# AFM_FUZZ_JOBS (default 2) harnesses run at once.
set -euo pipefail

seconds="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/build-fuzz"
jobs="${AFM_FUZZ_JOBS:-2}"

# Debug adds only -g, so -O1 stands and asserts stay on; fuzzer-no-link instruments the library
# too, and the harnesses link libFuzzer itself (fuzz/CMakeLists.txt).
nice -n 10 cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++-14 \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -g -O1" \
  -DAFM_BUILD_FUZZERS=ON -DAFM_BUILD_TESTS=OFF -DAFM_BUILD_BENCH=OFF -DAFM_BUILD_PYTHON=OFF >/dev/null

harnesses=()
for source in "$root"/fuzz/fuzz_*.cpp; do harnesses+=("$(basename "$source" .cpp)"); done
nice -n 10 cmake --build "$build" --target "${harnesses[@]}" -j2

export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
mkdir -p "$build/logs"

# A harness's extra libFuzzer flags, from its `// fuzz.sh flags:` line.
source_flags() { sed -n 's|^// fuzz.sh flags: ||p' "$root/fuzz/$1.cpp"; }

if [ "$seconds" = --replay ]; then
  failed=0
  for harness in "${harnesses[@]}"; do
    name="${harness#fuzz_}"
    # shellcheck disable=SC2046
    if "$build/fuzz/$harness" -runs=0 $(source_flags "$harness") "$root/fuzz/corpus/$name" >"$build/logs/$name.replay.log" 2>&1; then
      echo "$harness: $(find "$root/fuzz/corpus/$name" -type f | wc -l) seeds, no findings"
    else
      failed=1
      echo "$harness: FAILED on a seed: build-fuzz/logs/$name.replay.log"
      grep -m 3 -E "ERROR: |runtime error|SUMMARY" "$build/logs/$name.replay.log" | sed 's/^/    /' || true
    fi
  done
  exit "$failed"
fi

# One harness: its log in build-fuzz/logs/<name>.log, its exit status in <name>.rc.
run_one() {
  local harness="$1" name="${1#fuzz_}"
  local corpus="$build/corpus/$name" findings="$build/findings/$name/"
  mkdir -p "$corpus" "$findings"
  if [ -d "$root/fuzz/corpus/$name" ]; then cp -r "$root/fuzz/corpus/$name/." "$corpus/"; fi
  local flags=(-max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
               -artifact_prefix="$findings")
  if [ -f "$root/fuzz/$name.dict" ]; then flags+=(-dict="$root/fuzz/$name.dict"); fi
  # shellcheck disable=SC2207
  flags+=($(source_flags "$harness"))
  local rc=0
  nice -n 10 "$build/fuzz/$harness" "${flags[@]}" "$corpus" >"$build/logs/$name.log" 2>&1 || rc=$?
  echo "$rc" >"$build/logs/$name.rc"
}

for harness in "${harnesses[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  echo "fuzzing $harness for ${seconds}s"
  run_one "$harness" &
done
wait

failed=0
for harness in "${harnesses[@]}"; do
  name="${harness#fuzz_}"
  rc="$(cat "$build/logs/$name.rc")"
  # The final stats when it ran to the end, else the last status line before the finding.
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$build/logs/$name.log" | tail -n 1)"
  [ -n "$execs" ] || execs="$(sed -n 's/^#\([0-9][0-9]*\).*/\1/p' "$build/logs/$name.log" | tail -n 1)"
  if [ "$rc" = 0 ]; then
    echo "$harness: ${execs:-?} execs, no findings"
  else
    failed=1
    echo "$harness: FOUND a problem after ${execs:-?} execs (exit $rc): build-fuzz/logs/$name.log, build-fuzz/findings/$name/"
    grep -m 3 -E "ERROR: |runtime error|SUMMARY" "$build/logs/$name.log" | sed 's/^/    /' || true
  fi
done

echo "fuzzing the HTTP API with schemathesis (${AFM_SCHEMATHESIS_EXAMPLES:-500} examples per operation)"
if ! AFM_SCHEMATHESIS_EXAMPLES="${AFM_SCHEMATHESIS_EXAMPLES:-500}" AFM_BINARY="$root/build/afm" \
    "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/server/test_schemathesis.py"; then
  failed=1
fi
exit "$failed"
