#!/usr/bin/env bash
# Builds the local control plane binary (tests/controlplane) once per source hash and prints its path.
#
# The binary is cached under ${CUBICLE_CACHE:-~/.cache/cubicle}/controlplane-<hash>/controlplane,
# where <hash> covers go.mod, go.sum, every Go source and this script, so warm runs skip the
# build. Nothing is written into the repository.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${CUBICLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cubicle}
hash=$(cd "$here" && cat go.mod go.sum build.sh $(ls *.go | sort) | sha256sum | cut -c1-16)
out="$cache/controlplane-$hash"
bin="$out/controlplane"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$out"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
# The Kubernetes version the binary reports on /version (Helm reads it); kept equal to go.mod.
kver=$(awk '$1=="k8s.io/kubernetes"{print $2; exit}' "$here/go.mod")
minor=$(echo "$kver" | cut -d. -f2)
start=$(date +%s)
(
  cd "$here"
  # Download first so that network trouble and compile errors are told apart.
  for i in 1 2 3; do go mod download && break; echo "go mod download failed (try $i), retrying" >&2; sleep 5; done
  go build -trimpath -o "$bin.tmp" -ldflags "-s -w \
    -X k8s.io/component-base/version.gitVersion=$kver \
    -X k8s.io/component-base/version.gitMajor=1 \
    -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/component-base/version.gitTreeState=clean \
    -X k8s.io/client-go/pkg/version.gitVersion=$kver" .
) >&2
mv "$bin.tmp" "$bin"
echo "built control plane $kver in $(( $(date +%s) - start ))s: $bin" >&2
echo "$bin"
