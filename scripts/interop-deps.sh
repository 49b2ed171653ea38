#!/usr/bin/env bash
# Installs the node packages the llama.cpp interop test needs (the
# @fugood/llama.node binding and only its linux-x64 CPU build) into
# $FEDLORA_INTEROP_DIR/node_modules (default: build/interop), unless already there.
#   scripts/interop-deps.sh            # install if missing
#   FEDLORA_INTEROP_DIR=/x scripts/interop-deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.7.15
DIR=${FEDLORA_INTEROP_DIR:-build/interop}
PKG="$DIR/node_modules/@fugood/llama.node/package.json"
NATIVE="$DIR/node_modules/@fugood/node-llama-linux-x64/index.node"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  # The binding uses N-API 5: Debian 12's nodejs 18 is new enough.
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "interop-deps: need node and npm (apt-get install nodejs npm)" >&2; exit 1; }
    SUDO=sudo
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "interop-deps: only linux-x64 is set up (found $(uname -s)-$(uname -m))" >&2
  exit 1
fi
if [ -f "$PKG" ] && [ -f "$NATIVE" ] && grep -q "\"version\": \"$VERSION\"" "$PKG"; then
  echo "interop-deps: @fugood/llama.node $VERSION already in $DIR"
  exit 0
fi
mkdir -p "$DIR"
# A private package.json keeps npm from walking up into the repository.
if [ ! -f "$DIR/package.json" ]; then
  printf '{\n  "name": "fedlora-interop",\n  "private": true\n}\n' > "$DIR/package.json"
fi
# --omit=optional skips the CUDA/Vulkan/other-platform builds that
# @fugood/llama.node lists as optional; the CPU build is named explicitly.
npm install --prefix "$DIR" --no-audit --no-fund --no-save --omit=optional \
  "@fugood/llama.node@$VERSION" "@fugood/node-llama-linux-x64@$VERSION"
test -f "$NATIVE" || { echo "interop-deps: $NATIVE missing after npm install" >&2; exit 1; }
echo "interop-deps: installed @fugood/llama.node $VERSION into $DIR"
