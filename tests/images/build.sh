#!/usr/bin/env bash
# Builds the real node's images here, never pulling anything, and prints the docker-archive path:
#
#   tests/images/build.sh pause      the pod sandbox (a static Go binary, tests/images/pause)
#   tests/images/build.sh operator   the operator: the release binary, its ldd libraries, uid 65532
#   tests/images/build.sh desktop    a Kasm-compatible desktop from Debian packages (mmdebstrap)
#
# Each archive is cached as ${CUBICLE_CACHE:-~/.cache/cubicle}/images/<name>-<hash>.tar, <hash>
# covering the image's inputs (this script, mkimage.py, its sources; for the operator the
# binary), so warm runs only hash. Nothing is written into the repository. The image names are
# the `*_IMAGE` values below; tests/node/node.sh imports the archives into the node's containerd.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${CUBICLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cubicle}/images
mkdir -p "$cache"
what=${1:?usage: build.sh pause|operator|desktop}

PAUSE_IMAGE=cubicle.localhost/pause:1
DESKTOP_IMAGE=cubicle.localhost/desktop:1
version=$(awk -F'"' '/^version *=/{print $2; exit}' "$repo/Cargo.toml")
OPERATOR_IMAGE=cubicle.localhost/cubicle:$version

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
log() { echo "[images] $*" >&2; }

case "$what" in
pause)
  out="$cache/pause-$(hash_of "$here/build.sh" "$here/mkimage.py" "$here/pause/pause.go").tar"
  [ -s "$out" ] && { echo "$out"; exit 0; }
  start=$(date +%s)
  root=$(mktemp -d); trap 'rm -rf "$root"' EXIT
  (cd "$here/pause" && GOTOOLCHAIN=local CGO_ENABLED=0 GO111MODULE=off \
    go build -trimpath -ldflags "-s -w" -o "$root/pause" pause.go)
  python3 "$here/mkimage.py" --tag "$PAUSE_IMAGE" --out "$out" --rootfs "$root" \
    --user 65535 --entrypoint '["/pause"]'
  log "built $PAUSE_IMAGE in $(( $(date +%s) - start ))s: $out"
  ;;
operator)
  # The release binary (cargo build --release), or $CUBICLE_OPERATOR_BIN.
  bin=${CUBICLE_OPERATOR_BIN:-$repo/target/release/cubicle}
  if [ ! -x "$bin" ]; then
    log "building the release binary (cargo build --release --bin cubicle)"
    (cd "$repo" && cargo build --release --locked --bin cubicle >&2)
  fi
  out="$cache/operator-$(hash_of "$here/build.sh" "$here/mkimage.py" "$bin").tar"
  [ -s "$out" ] && { echo "$out"; exit 0; }
  start=$(date +%s)
  root=$(mktemp -d); trap 'rm -rf "$root"' EXIT
  # Only what the binary needs: itself, the dynamic loader and the libraries ldd lists (no musl
  # target can be fetched here, so the binary links glibc), plus /tmp. No shell, no package manager.
  install -D -m 0755 "$bin" "$root/usr/local/bin/cubicle"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
  mkdir -p "$root/tmp" "$root/etc"
  chmod 1777 "$root/tmp"
  printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  python3 "$here/mkimage.py" --tag "$OPERATOR_IMAGE" --out "$out" --rootfs "$root" \
    --user 65532:65532 --entrypoint '["/usr/local/bin/cubicle"]' --port 8080
  log "built $OPERATOR_IMAGE in $(( $(date +%s) - start ))s: $out"
  ;;
desktop)
  out="$cache/desktop-$(hash_of "$here/build.sh" "$here/mkimage.py" "$here/desktop/start.sh").tar"
  [ -s "$out" ] && { echo "$out"; exit 0; }
  command -v mmdebstrap >/dev/null || { log "mmdebstrap is missing (apt-get install mmdebstrap)"; exit 1; }
  start=$(date +%s)
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  # The host's own Debian sources (deb822 or one-line), so the image comes from the mirror apt uses.
  sources=$(cat /etc/apt/sources.list.d/debian.sources 2>/dev/null || cat /etc/apt/sources.list)
  echo "$sources" | mmdebstrap --quiet --variant=apt --skip=output/dev \
    --aptopt='Apt::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --include=xvfb,x11vnc,novnc,websockify,twm,xterm,openssl,x11-utils \
    --customize-hook='chroot "$1" useradd --uid 1000 --user-group --create-home --home-dir /home/kasm-user --shell /bin/sh kasm-user' \
    --customize-hook="copy-in $here/desktop/start.sh /usr/local/bin" \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    bookworm "$work/rootfs.tar" - >&2
  python3 "$here/mkimage.py" --tag "$DESKTOP_IMAGE" --out "$out" --layer "$work/rootfs.tar" \
    --user 1000:1000 --workdir /home/kasm-user --env HOME=/home/kasm-user \
    --entrypoint '["/usr/local/bin/start.sh"]' --port 6901
  log "built $DESKTOP_IMAGE in $(( $(date +%s) - start ))s: $out"
  ;;
name)
  # build.sh name pause|operator|desktop: the image reference only.
  case "${2:-}" in pause) echo "$PAUSE_IMAGE";; operator) echo "$OPERATOR_IMAGE";; desktop) echo "$DESKTOP_IMAGE";; *) exit 2;; esac
  exit 0
  ;;
*) echo "usage: build.sh pause|operator|desktop|name WHAT" >&2; exit 2 ;;
esac
# Older builds of the same image (other input hashes) are dropped; the cache holds one of each.
find "$cache" -maxdepth 1 -name "$what-*.tar" ! -path "$out" -delete
echo "$out"
