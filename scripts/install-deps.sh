#!/usr/bin/env bash
# Install the Debian packages afm builds against, and the pinned npm package the tokenizer's
# differential test compares with. Installs only what is missing, so it is cheap to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(g++ cmake make pkg-config libgtest-dev libgmock-dev libbenchmark-dev
          nlohmann-json3-dev libpcre2-dev libcli11-dev libcpp-httplib-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node may come from another source (NodeSource bundles npm); only a missing command needs Debian's.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ -f tests/tokenizer_diff/package-lock.json && ! -d tests/tokenizer_diff/node_modules ]]; then
  npm ci --silent --prefix tests/tokenizer_diff
fi
