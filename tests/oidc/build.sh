#!/usr/bin/env bash
# Builds the local OpenID Provider (tests/oidc) once per source hash and prints its path.
#
# Cached under ${CUBICLE_CACHE:-~/.cache/cubicle}/oidc-<hash>/oidc, where <hash> covers go.mod,
# go.sum, the Go sources and this script. Nothing is written into the repository.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CUBICLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cubicle}
hash=$(cd "$here" && cat go.mod go.sum build.sh $(ls *.go | sort) | sha256sum | cut -c1-16)
out="$cache/oidc-$hash"
bin="$out/oidc"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$out"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
start=$(date +%s)
(
  cd "$here"
  for i in 1 2 3; do go mod download && break; echo "go mod download failed (try $i), retrying" >&2; sleep 5; done
  go build -trimpath -o "$bin.tmp" -ldflags "-s -w" .
) >&2
mv "$bin.tmp" "$bin"
echo "built the OpenID Provider in $(( $(date +%s) - start ))s: $bin" >&2
echo "$bin"
