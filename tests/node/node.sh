#!/usr/bin/env bash
# A real node for the local control plane: containerd + runc + the CNI bridge + the kubelet from
# the control plane's multi-call binary, with images built here (tests/images) and never pulled.
#
#   node.sh check                      says what the host lacks to run containers (exit 1 if any)
#   node.sh up DIR KUBECONFIG [NAME]   starts the node, waits until it is Ready, writes DIR/node-ready
#   node.sh down DIR                   stops it and puts the host back as `up` found it
#   node.sh host-state                 prints the host state that up changes and down restores
#
# What the node changes on the host, and how down undoes it (docs/real-node.md has the why):
# - the bridge $BRIDGE ($SUBNET, plus 10.96.0.1/32: the `kubernetes` Service IP, relayed to the API
#   server's loopback port by `controlplane relay`, as there is no kube-proxy): deleted;
# - sysctls the kubelet tunes (kernel.panic, vm.overcommit_memory...) and ip_forward (CNI bridge):
#   saved and restored;
# - cgroups: everything lives under /$CGROUP in each hierarchy: killed and removed;
# - mounts (netns, pod volumes, container rootfs, the kubelet's root) all live under DIR: unmounted;
# - iptables: untouched. The node needs no rules (no kube-proxy, no masquerade), and the kubelet
#   runs with a PATH where iptables fails, so it creates none of its KUBE-* chains;
# - files: containerd, kubelet, CNI state and pod logs live under DIR; /run/containerd (shim
#   sockets) and /var/lib/cni (CNI result cache) are removed if they did not exist before.
# Every address involved is on this machine: loopback, the bridge and the pods behind it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
BRIDGE=${CUBICLE_NODE_BRIDGE:-cubicle0}
SUBNET=${CUBICLE_NODE_SUBNET:-10.223.22.0/24}
GATEWAY=${SUBNET%.*}.1
SERVICE_IP=10.96.0.1
CGROUP=cubicle-node
SYSCTLS="kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward net.ipv6.conf.all.forwarding net.bridge.bridge-nf-call-iptables"
log() { echo "[node] $*" >&2; }

missing() {
  local m=()
  [ "$(id -u)" = 0 ] || m+=("root (the kubelet and containerd run as root)")
  for b in containerd ctr runc ip; do command -v $b >/dev/null || m+=("$b (apt-get install containerd runc iproute2)"); done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ] ||
    m+=("CNI plugins in /usr/lib/cni (apt-get install containernetworking-plugins)")
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || m+=("overlayfs in the kernel")
  [ -d /sys/fs/cgroup ] || m+=("cgroups at /sys/fs/cgroup")
  if [ ${#m[@]} = 0 ] && ! unshare --mount --net --pid --fork true 2>/dev/null; then
    m+=("permission to create namespaces (unshare --mount --net --pid failed)")
  fi
  printf '%s\n' "${m[@]}"
}

host_state() {
  echo "# sysctls"
  for s in $SYSCTLS; do echo "$s=$(sysctl -n "$s" 2>/dev/null || echo absent)"; done
  echo "# links"; ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort
  echo "# addresses"; ip -o addr show | awk '{print $2, $4}' | sort
  echo "# routes"; ip route show | sort
  echo "# mounts"; awk '{print $5}' /proc/self/mountinfo | sort
  echo "# cgroups"; for h in /sys/fs/cgroup/*/; do [ -d "$h$CGROUP" ] && echo "$h$CGROUP"; done; true
  echo "# paths"; for p in /run/containerd /var/lib/cni /run/netns /var/run/netns /var/lib/kubelet /var/log/pods /etc/cni; do [ -e "$p" ] && echo "$p"; done; true
  echo "# iptables"
  for t in iptables-save ip6tables-save; do
    if command -v $t >/dev/null; then { $t 2>/dev/null || true; } | { grep -v '^#' || true; } | sed 's/\[[0-9]*:[0-9]*\]//'; fi
  done
}

cgroup_dirs() { for h in /sys/fs/cgroup/*/; do [ -d "$h" ] && [ ! -L "${h%/}" ] && echo "$h$CGROUP"; done; }

case "${1:-}" in
check)
  m=$(missing)
  if [ -n "$m" ]; then echo "this host cannot run a real node; missing:"; echo "$m"; exit 1; fi
  echo "ok"
  ;;
host-state) host_state ;;
up)
  dir=${2:?usage: node.sh up DIR KUBECONFIG [NAME]}; kubeconfig=${3:?kubeconfig}; name=${4:-real-node-0}
  m=$(missing); [ -z "$m" ] || { echo "this host cannot run a real node; missing:" >&2; echo "$m" >&2; exit 3; }
  # A node that is stopping (an earlier test process) gets a minute to finish.
  for i in $(seq 120); do ip link show "$BRIDGE" >/dev/null 2>&1 || break; sleep 0.5; done
  ip link show "$BRIDGE" >/dev/null 2>&1 && { log "bridge $BRIDGE exists: another real node runs (node.sh down DIR stops it)"; exit 1; }
  if ip route show | grep -v "dev $BRIDGE" | grep -q "^${SUBNET%.*}\."; then log "$SUBNET is already routed on this host; set CUBICLE_NODE_SUBNET"; exit 1; fi
  t0=$(date +%s%N)
  mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
  host_state >"$dir/host-before"
  for s in $SYSCTLS; do v=$(sysctl -n "$s" 2>/dev/null) && echo "$s=$v"; done >"$dir/sysctls-before"
  cp=${CUBICLE_CONTROLPLANE_BIN:-$(bash "$repo/tests/controlplane/build.sh")}
  pause=$(bash "$repo/tests/images/build.sh" pause)
  pause_ref=$(bash "$repo/tests/images/build.sh" name pause)
  mkdir -p "$dir/cni/net.d" "$dir/cni/ipam" "$dir/containerd" "$dir/kubelet" "$dir/pod-logs" "$dir/nobin" "$dir/logs"
  for b in iptables ip6tables iptables-save ip6tables-save iptables-restore ip6tables-restore; do
    printf '#!/bin/sh\necho "iptables is not used by the cubicle real node" >&2\nexit 1\n' >"$dir/nobin/$b"; chmod +x "$dir/nobin/$b"
  done
  for c in $(cgroup_dirs); do mkdir -p "$c"; done
  ip link add "$BRIDGE" type bridge
  ip addr add "$GATEWAY/${SUBNET#*/}" dev "$BRIDGE"
  ip addr add "$SERVICE_IP/32" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  cat >"$dir/cni/net.d/10-cubicle.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "cubicle", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$dir/cni/ipam", "ranges": [[{"subnet": "$SUBNET", "gateway": "$GATEWAY"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}
JSON
  sock="$dir/containerd/containerd.sock"
  cat >"$dir/containerd/config.toml" <<TOML
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_ref"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
TOML
  setsid containerd --config "$dir/containerd/config.toml" </dev/null >"$dir/logs/containerd.log" 2>&1 &
  echo $! >"$dir/containerd.pid"
  for i in $(seq 100); do ctr -a "$sock" version >/dev/null 2>&1 && break; sleep 0.1; done
  ctr -a "$sock" version >/dev/null || { log "containerd did not start: $dir/logs/containerd.log"; exit 1; }
  t_import=$(date +%s%N)
  images=("$pause")
  # Images by name (tests/images/build.sh builds each once per input hash), or archive paths.
  for img in ${CUBICLE_NODE_IMAGES:-}; do
    case "$img" in */*) images+=("$img") ;; *) images+=("$(bash "$repo/tests/images/build.sh" "$img")") ;; esac
  done
  for img in "${images[@]}"; do ctr -a "$sock" -n k8s.io images import --all-platforms "$img" >/dev/null; done
  import_ms=$(( ($(date +%s%N) - t_import) / 1000000 ))
  # The API server's address for the relay (the `kubernetes` Service, 10.96.0.1:443).
  server=$(awk '$1=="server:"{print $2; exit}' "$kubeconfig")
  hostport=${server#https://}
  setsid "$cp" relay --listen "$SERVICE_IP:443" --to "$hostport" </dev/null >"$dir/logs/relay.log" 2>&1 &
  echo $! >"$dir/relay.pid"
  # The cluster CA (from the kubeconfig): it signs the API server's kubelet client certificate.
  kubectl --kubeconfig "$kubeconfig" config view --raw --minify \
    -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$dir/kubelet/ca.crt"
  grep -q "BEGIN CERTIFICATE" "$dir/kubelet/ca.crt" || { log "no CA in $kubeconfig"; exit 1; }
  kport=$(python3 -c 'import socket,sys;s=socket.socket();s.bind((sys.argv[1],0));print(s.getsockname()[1])' "$GATEWAY")
  cat >"$dir/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GATEWAY
port: $kport
readOnlyPort: 0
healthzPort: 0
# The node's address is the bridge's (the API server refuses to proxy to a loopback node IP).
# No anonymous callers: the API server presents its kubelet client certificate (signed by the
# cluster CA) for logs, exec and port-forward, bearer tokens are checked with a TokenReview and
# every request is authorized with a SubjectAccessReview, so a pod on the bridge gets 401.
authentication: {anonymous: {enabled: false}, webhook: {enabled: true}, x509: {clientCAFile: $dir/kubelet/ca.crt}}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://$sock
podLogsDir: $dir/pod-logs
resolvConf: /etc/resolv.conf
makeIPTablesUtilChains: false
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerWithTaints: [{key: cubicle.dev/real-node, value: "true", effect: NoSchedule}]
YAML
  PATH="$dir/nobin:$PATH" setsid "$cp" kubelet --config "$dir/kubelet/config.yaml" --kubeconfig "$kubeconfig" \
    --root-dir "$dir/kubelet/root" --hostname-override "$name" --node-ip "$GATEWAY" \
    --node-labels "cubicle.dev/real-node=true,topology.kubernetes.io/zone=real" --v 1 \
    </dev/null >"$dir/logs/kubelet.log" 2>&1 &
  echo $! >"$dir/kubelet.pid"
  t_kubelet=$(date +%s%N)
  for i in $(seq 120); do
    st=$(kubectl --kubeconfig "$kubeconfig" get node "$name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
    [ "$st" = True ] && break
    kill -0 "$(cat "$dir/kubelet.pid")" 2>/dev/null || { log "the kubelet exited: $dir/logs/kubelet.log"; tail -5 "$dir/logs/kubelet.log" >&2; exit 1; }
    sleep 0.5
  done
  [ "$st" = True ] || { log "node $name not Ready after 60s: $dir/logs/kubelet.log"; exit 1; }
  now=$(date +%s%N)
  printf '{"name":"%s","dir":"%s","subnet":"%s","startupMs":%d,"importMs":%d,"kubeletToReadyMs":%d}\n' \
    "$name" "$dir" "$SUBNET" $(( (now - t0) / 1000000 )) "$import_ms" $(( (now - t_kubelet) / 1000000 )) >"$dir/node-ready"
  log "node $name Ready: $(cat "$dir/node-ready")"
  ;;
down)
  dir=${2:?usage: node.sh down DIR}
  [ -f "$dir/host-before" ] || { log "no node in $dir"; exit 0; }
  dir=$(cd "$dir" && pwd)
  sock="$dir/containerd/containerd.sock"
  stop() { # pidfile
    local f=$1 p
    [ -f "$f" ] || return 0
    p=$(cat "$f")
    kill -TERM "$p" 2>/dev/null || { rm -f "$f"; return 0; }
    for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    rm -f "$f"
  }
  stop "$dir/kubelet.pid"
  stop "$dir/relay.pid"
  # Every container (and pod sandbox) of the node: kill, then delete, so shims exit and unmount.
  if ctr -a "$sock" version >/dev/null 2>&1; then
    for id in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do ctr -a "$sock" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 0.5
    for id in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do ctr -a "$sock" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr -a "$sock" -n k8s.io containers ls -q 2>/dev/null); do ctr -a "$sock" -n k8s.io containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  stop "$dir/containerd.pid"
  # Shims that outlived containerd (they name its socket on their command line).
  for p in $(pgrep -f "containerd-shim.*-address $sock" || true); do kill -KILL "$p" 2>/dev/null || true; done
  # Processes still in the node's cgroups (a container whose shim died), then the cgroups.
  for c in $(cgroup_dirs); do
    [ -d "$c" ] || continue
    find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  done
  sleep 0.2
  for c in $(cgroup_dirs); do
    if [ -d "$c" ]; then find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done
  # Mounts the node made (network namespaces, volumes, rootfs, the kubelet's root): all of them
  # live under DIR (containerd's root and state and the kubelet's root are there). Deepest first.
  for i in 1 2 3; do
    awk '{print $5}' /proc/self/mountinfo | { grep "^$dir/" || true; } | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  while IFS='=' read -r k v; do sysctl -qw "$k=$v" >/dev/null 2>&1 || log "could not restore $k=$v"; done <"$dir/sysctls-before"
  for p in /run/containerd /var/lib/cni /run/netns /var/lib/kubelet /var/log/pods /etc/cni; do
    if [ -e "$p" ] && ! grep -qxF "$p" "$dir/host-before"; then rm -rf "$p"; fi
  done
  # The bridge goes last: others (tests/realnode_host.rs) take its absence to mean that a node's
  # stop is over, so everything else the node changed must be restored before it disappears.
  ip link del "$BRIDGE" 2>/dev/null || true
  host_state >"$dir/host-after"
  if ! diff -u "$dir/host-before" "$dir/host-after" >"$dir/host-diff"; then
    log "the host differs from before up ($dir/host-diff):"; cat "$dir/host-diff" >&2; exit 1
  fi
  rm -rf "$dir/containerd/root" "$dir/containerd/state" "$dir/kubelet/root" 2>/dev/null || true
  log "node stopped; host as before"
  ;;
*) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
