#!/usr/bin/env bash
# A real single-node kind cluster built offline: Docker from Debian packages, base images from
# debootstrap, the kind node image assembled from Go-built Kubernetes components. No image registry
# is contacted. On a machine with a normal Docker and registry access, the README's plain
# `kind create cluster --config kind-config.yaml` path needs none of this.
#
#   kind.sh up       build/reuse tools and images, start dockerd if none runs, create cluster
#                    "llmray" (no-op when healthy); prints `export KUBECONFIG=...` on stdout
#   kind.sh images   build the project images (operator, runtime) and load them into the cluster
#   kind.sh prepare  build everything `up` and `images` need (tools, node image, project images)
#                    without creating a cluster: `make test` runs it while the other tiers run
#   kind.sh down     delete the cluster; stop dockerd if (and only if) this script started it, and
#                    remove what it left behind (bridges, nft tables, mounts)
#   kind.sh status   exit 0 when the cluster answers, 3 when not
#   kind.sh kubeconfig | env
#
# Caches (tools, Docker's data root with every image) live in ~/.cache/llmray so clean clones (CI)
# rebuild nothing; the cluster's state (kubeconfig, our dockerd's pid) lives in .cache/kind.
# Env: LLMRAY_KIND_SERVE_PORT (127.0.0.1 port mapped to the serve NodePort 30800, default 18000).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=/dev/null
source "$repo/tests/cluster/versions.env"
# shellcheck source=/dev/null
source "$here/versions.env"

name=llmray
cache="${LLMRAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmray}"
tools="$cache/kind/$KIND_VERSION-k8s-$KUBE_VERSION-coredns-$COREDNS_VERSION-crictl-$CRICTL_VERSION"
data_root="$cache/docker"
state="${LLMRAY_KIND_DIR:-$repo/.cache/kind}"
kubeconfig="$state/kubeconfig"
serve_port="${LLMRAY_KIND_SERVE_PORT:-18000}"
node_image="llmray.local/kind-node:$KUBE_VERSION-r$IMAGE_RECIPE"
debian_image="local/debian:$DEBIAN_SUITE"
python_image="local/python:3.11-slim-bookworm"
cbin="$cache/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"
# Debian's Docker client (20.10) drives the daemon's built-in BuildKit; a newer client on PATH
# without the buildx plugin refuses BuildKit builds.
docker_cli=docker
[ -x /usr/bin/docker ] && docker_cli=/usr/bin/docker
export DOCKER_BUILDKIT=1 GOTOOLCHAIN=local GOFLAGS=-trimpath CGO_ENABLED=0

t0=$(date +%s)
log() { echo "[kind +$(($(date +%s) - t0))s] $*" >&2; }
die() { echo "[kind] ERROR: $*" >&2; exit 1; }
d() { "$docker_cli" "$@"; }
k() { "$cbin/kubectl" --kubeconfig "$kubeconfig" "$@"; }
have_image() { d image inspect "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------------- host
host_packages() {
  local missing=()
  [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v iptables >/dev/null || missing+=(iptables)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v gcc >/dev/null || missing+=(gcc libc6-dev)
  [ ${#missing[@]} -eq 0 ] && return
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
}

dockerd_pid() {
  local pid
  pid="$(cat "$state/dockerd.pid" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--data-root $data_root" && echo "$pid"
}

dockerd_up() {
  if d info >/dev/null 2>&1; then
    [ -n "$(dockerd_pid)" ] || log "using the Docker daemon already running"
    return
  fi
  mkdir -p "$state" "$data_root"
  # Only what this script creates is removed by `down`: remember the nft tables that exist now.
  nft list tables 2>/dev/null | sort >"$state/nft-before" || true
  log "starting dockerd (data root $data_root)"
  # Docker's default runtime becomes the capability-pruning runc wrapper; --mtu follows the host's
  # uplink so pods can reach the package registries through the host.
  local mtu
  mtu="$(ip -o link show "$(ip route show default 2>/dev/null | awk '{print $5; exit}')" 2>/dev/null |
    sed -n 's/.* mtu \([0-9]*\).*/\1/p')"
  nohup dockerd --data-root "$data_root" --add-runtime "capfix=$here/runc-capfix" \
    --default-runtime capfix --mtu "${mtu:-1500}" >"$state/dockerd.log" 2>&1 &
  echo $! >"$state/dockerd.pid"
  for _ in $(seq 120); do d info >/dev/null 2>&1 && return; sleep 0.5; done
  die "dockerd did not come up; log: $state/dockerd.log"
}

# ---------------------------------------------------------------------------------------- tools
build_tools() {
  mkdir -p "$tools"
  [ -x "$cbin/kubectl" ] && [ -x "$cbin/etcd" ] || bash "$repo/tests/cluster/build.sh" >/dev/null
  if [ ! -x "$tools/kind" ]; then
    log "go install kind $KIND_VERSION"
    GOBIN="$tools" go install -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
  fi
  if [ ! -x "$tools/crictl" ]; then
    log "go install crictl $CRICTL_VERSION"
    GOBIN="$tools" go install -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  fi
  if [ ! -x "$tools/kubelet" ] || [ ! -x "$tools/kubeadm" ] || [ ! -x "$tools/kube-proxy" ]; then
    log "building kubelet, kubeadm, kube-proxy $KUBE_VERSION (a few minutes on 2 cores)"
    local minor="${KUBE_VERSION#v1.}" ld
    minor="${minor%%.*}"
    ld="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1"
    ld="$ld -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
    ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1"
    ld="$ld -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    (cd "$here/build/kubernetes" && go build -ldflags "$ld" -o "$tools/" \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kube-proxy)
  fi
  if [ ! -x "$tools/coredns" ]; then
    log "building CoreDNS $COREDNS_VERSION"
    (cd "$here/build/coredns" && go build -ldflags "-s -w" -o "$tools/coredns" .)
  fi
  if [ ! -x "$tools/pause" ]; then
    local src
    src="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
    gcc -Os -static -DVERSION="v$PAUSE_VERSION" -o "$tools/pause" "$src/build/pause/linux/pause.c"
    strip "$tools/pause"
  fi
}

# ---------------------------------------------------------------------------------------- images
image_dir() { local dir="$state/img/$1"; rm -rf "$dir"; mkdir -p "$dir"; echo "$dir"; }

base_images() {
  if ! have_image "$debian_image"; then
    log "debootstrap $DEBIAN_SUITE (minbase) -> $debian_image"
    local mirror rootfs="$state/rootfs"
    mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "${mirror:-http://deb.debian.org/debian}" >"$state/debootstrap.log" 2>&1 ||
      die "debootstrap failed; log: $state/debootstrap.log"
    tar -C "$rootfs" -c . | d import - "$debian_image" >/dev/null
    rm -rf "$rootfs"
  fi
  if ! have_image "$python_image"; then
    log "building $python_image (Debian python3 in a venv)"
    d build -q --build-arg "BASE=$debian_image" -t "$python_image" -f "$here/images/python.Dockerfile" "$here/images" >/dev/null
  fi
  if ! have_image local/static-base:1; then
    local root
    root="$(image_dir static-base)/root"
    mkdir -p "$root"/{tmp,etc/ssl/certs,usr/local/bin}
    chmod 1777 "$root/tmp"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    tar -C "$root" -c . | d import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - local/static-base:1 >/dev/null
  fi
}

# component_image TAG BINARY [PATH_IN_IMAGE] [BASE]
component_image() {
  local tag=$1 binary=$2 target=${3:-/usr/local/bin/$(basename "$2")} base=${4:-local/static-base:1} dir
  have_image "$tag" && return
  dir="$(image_dir "$(echo "$tag" | tr '/:' '__')")"
  cp "$binary" "$dir/"
  printf 'FROM %s\nCOPY %s %s\n' "$base" "$(basename "$binary")" "$target" >"$dir/Dockerfile"
  d build -q -t "$tag" "$dir" >/dev/null
}

component_images() {
  local c reg=registry.k8s.io
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    component_image "$reg/$c:$KUBE_VERSION" "$cbin/$c"
  done
  component_image "$reg/etcd:$ETCD_IMAGE_TAG" "$cbin/etcd"
  if ! have_image "$reg/coredns/coredns:$COREDNS_VERSION"; then
    local dir
    dir="$(image_dir coredns)"
    cp "$tools/coredns" "$dir/"
    printf 'FROM local/static-base:1\nCOPY coredns /coredns\nENTRYPOINT ["/coredns"]\n' >"$dir/Dockerfile"
    d build -q -t "$reg/coredns/coredns:$COREDNS_VERSION" "$dir" >/dev/null
  fi
  if ! have_image "$reg/kube-proxy:$KUBE_VERSION"; then
    local dir
    dir="$(image_dir kube-proxy)"
    cp "$tools/kube-proxy" "$dir/"
    cat >"$dir/Dockerfile" <<EOF
FROM $debian_image
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    iptables nftables conntrack ipset kmod >/dev/null && rm -rf /var/lib/apt/lists/*
COPY kube-proxy /usr/local/bin/kube-proxy
EOF
    d build -q -t "$reg/kube-proxy:$KUBE_VERSION" "$dir" >/dev/null
  fi
  if ! have_image "$reg/pause:$PAUSE_VERSION"; then
    local dir
    dir="$(image_dir pause)"
    cp "$tools/pause" "$dir/"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$dir/Dockerfile"
    d build -q -t "$reg/pause:$PAUSE_VERSION" "$dir" >/dev/null
  fi
  # kind's containerd config names pause:3.10 as the sandbox image.
  d tag "$reg/pause:$PAUSE_VERSION" "$reg/pause:3.10"
}

kind_base_image() {
  have_image local/kind-base:$DEBIAN_SUITE-r$IMAGE_RECIPE && return
  log "building the kind base image (Debian systemd, containerd, runc, CNI plugins)"
  local src dir
  src="$(go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  dir="$(image_dir kind-base)"
  cp -r "$src/images/base/files" "$dir/"
  chmod -R u+w "$dir"
  # Negative oom_score_adj is refused on these VMs even for root; containerd must not ask for it.
  sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$dir/files/etc/containerd/config.toml"
  cp "$tools/crictl" "$dir/files/crictl"
  d build -q --build-arg "BASE=$debian_image" -t "local/kind-base:$DEBIAN_SUITE-r$IMAGE_RECIPE" \
    -f "$here/images/kind-base.Dockerfile" "$dir" >/dev/null
}

node_image_build() {
  have_image "$node_image" && return
  log "assembling the node image $node_image (kind's node-image steps, without pulls)"
  local reg=registry.k8s.io id=llmray-node-build tar="$state/node-images.tar" b
  d rm -f -v "$id" >/dev/null 2>&1 || true
  d save -o "$tar" "$reg/kube-apiserver:$KUBE_VERSION" "$reg/kube-controller-manager:$KUBE_VERSION" \
    "$reg/kube-scheduler:$KUBE_VERSION" "$reg/kube-proxy:$KUBE_VERSION" "$reg/etcd:$ETCD_IMAGE_TAG" \
    "$reg/coredns/coredns:$COREDNS_VERSION" "$reg/pause:$PAUSE_VERSION" "$reg/pause:3.10"
  d run -d --entrypoint=sleep --name="$id" --security-opt seccomp=unconfined \
    "local/kind-base:$DEBIAN_SUITE-r$IMAGE_RECIPE" infinity >/dev/null
  for b in "$tools/kubeadm" "$tools/kubelet" "$cbin/kubectl"; do d cp "$b" "$id:/usr/bin/"; done
  d exec "$id" bash -c "chown root:root /usr/bin/kube*; echo -n $KUBE_VERSION > /kind/version"
  # Single node, no kindnetd image: a static bridge + host-local + portmap CNI config.
  d cp "$here/images/10-bridge.conflist" "$id:/etc/cni/net.d/10-bridge.conflist"
  d exec "$id" bash -c 'nohup containerd >/dev/null 2>&1 & for i in $(seq 30); do [ -S /run/containerd/containerd.sock ] && ctr version >/dev/null 2>&1 && exit 0; sleep 0.5; done; exit 1'
  d exec -i "$id" ctr --namespace=k8s.io images import --all-platforms --no-unpack --digests - <"$tar" >/dev/null
  d exec "$id" bash -c 'kill $(pidof containerd); while pidof containerd >/dev/null; do sleep 0.2; done; rm -rf /tmp/*'
  d commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' "$id" "$node_image" >/dev/null
  d rm -f -v "$id" >/dev/null
  rm -f "$tar"
}

# ---------------------------------------------------------------------------------------- cluster
cluster_config() {
  cat <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true   # no kindnetd image here; the node image carries a static bridge CNI config
  podSubnet: 10.244.0.0/16
nodes:
  - role: control-plane
    labels:
      llmray.io/node-pool: cpu
    extraPortMappings:
      - containerPort: 30800  # an LLMDeployment's serve Service with nodePort 30800
        hostPort: $serve_port
        listenAddress: "127.0.0.1"
        protocol: TCP
kubeadmConfigPatches:
  - |
    kind: KubeletConfiguration
    failCgroupV1: false       # kubelet >= 1.35 refuses cgroup v1 hosts unless told otherwise
EOF
}

healthy() {
  [ -s "$kubeconfig" ] && [ -x "$cbin/kubectl" ] && k --request-timeout=5s get --raw=/readyz >/dev/null 2>&1
}

cluster_up() {
  if "$tools/kind" get clusters 2>/dev/null | grep -qx "$name"; then
    "$tools/kind" get kubeconfig --name "$name" >"$kubeconfig"
    healthy && { log "cluster $name already running"; return; }
    log "cluster $name exists but does not answer: recreating"
    "$tools/kind" delete cluster --name "$name" >&2
  fi
  cluster_config >"$state/kind-cluster.yaml"
  log "kind create cluster (Kubernetes $KUBE_VERSION)"
  "$tools/kind" create cluster --name "$name" --image "$node_image" --config "$state/kind-cluster.yaml" \
    --kubeconfig "$kubeconfig" --wait 3m >&2
  k -n kube-system rollout status deploy/coredns --timeout=180s >/dev/null
}

# World-writable folders on the node for hostPath-backed ReadWriteMany volumes (tests, kind demo):
# the Ray pods run as uid 1000 and a hostPath volume keeps the node folder's owner and mode.
shared_dirs() {
  d exec "$name-control-plane" bash -c \
    'mkdir -p /var/lib/llmray/shared/demo && chmod 1777 /var/lib/llmray/shared /var/lib/llmray/shared/demo'
}

build_node_image() {
  mkdir -p "$state"
  host_packages
  build_tools
  dockerd_up
  base_images
  component_images
  kind_base_image
  node_image_build
}

cmd_up() {
  build_node_image
  cluster_up
  shared_dirs
  log "cluster $name ready"
  echo "export KUBECONFIG=$kubeconfig"
}

# ---------------------------------------------------------------------------------------- images
# The project's images, built from the repo with a locally built base, then loaded into the node
# only when the node does not have that exact image yet.
project_images() {
  local ca=() tag
  [ -f /etc/ssl/certs/ca-certificates.crt ] && ca=(--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt)
  for tag in operator ray-runtime; do
    local file=operator old
    [ "$tag" = ray-runtime ] && file=runtime
    old="$(d image inspect -f '{{.Id}}' "llmray/$tag:0.1.0" 2>/dev/null || true)"
    log "docker build llmray/$tag:0.1.0"
    d build -q "${ca[@]}" --build-arg "PYTHON=$python_image" -t "llmray/$tag:0.1.0" \
      -f "$repo/docker/Dockerfile.$file" "$repo" >/dev/null
    # The image this build replaced (its layers shared with the new one stay): no dangling copies.
    if [ -n "$old" ] && [ "$old" != "$(d image inspect -f '{{.Id}}' "llmray/$tag:0.1.0")" ]; then
      d rmi "$old" >/dev/null 2>&1 || true
    fi
  done
}

load_images() {
  local img id
  for img in llmray/operator:0.1.0 llmray/ray-runtime:0.1.0; do
    id="$(d image inspect -f '{{.Id}}' "$img")"
    if d exec "$name-control-plane" ctr -n k8s.io images ls -q 2>/dev/null | grep -qx "$id"; then
      continue
    fi
    log "kind load docker-image $img"
    "$tools/kind" load docker-image --name "$name" "$img" >&2
    d exec "$name-control-plane" ctr -n k8s.io images tag --force "docker.io/$img" "$id" >/dev/null 2>&1 || true
  done
}

cmd_images() {
  dockerd_up
  base_images
  project_images
  if "$tools/kind" get clusters 2>/dev/null | grep -qx "$name"; then load_images; fi
}

# ---------------------------------------------------------------------------------------- down
cmd_down() {
  if [ -x "$tools/kind" ] && d info >/dev/null 2>&1 && "$tools/kind" get clusters 2>/dev/null | grep -qx "$name"; then
    log "deleting cluster $name"
    "$tools/kind" delete cluster --name "$name" >&2
  fi
  local pid
  pid="$(dockerd_pid || true)"
  if [ -n "$pid" ]; then
    d network rm kind >/dev/null 2>&1 || true
    log "stopping the dockerd this script started (pid $pid)"
    kill "$pid"
    for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && die "dockerd (pid $pid) did not stop"
    # What dockerd leaves on the host: its bridge, its nft tables (iptables-nft), overlay mounts.
    ip link delete docker0 2>/dev/null || true
    local table
    { nft list tables 2>/dev/null | sort | comm -13 "$state/nft-before" - 2>/dev/null || true; } |
      while read -r table; do
        # shellcheck disable=SC2086
        nft delete $table 2>/dev/null || true
      done
    { grep -F -e " $data_root" -e " /run/docker" /proc/mounts || true; } | awk '{print $2}' | sort -r |
      while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -f "$state/dockerd.pid" "$state/nft-before"
  fi
  rm -f "$kubeconfig"
}

cmd_status() {
  if healthy; then k get nodes; exit 0; fi
  echo "kind cluster $name not running" >&2
  exit 3
}

case "${1:-}" in
  up) cmd_up ;;
  images) cmd_images ;;
  prepare) build_node_image && project_images ;;
  down) cmd_down ;;
  status) cmd_status ;;
  kubeconfig) echo "$kubeconfig" ;;
  env) echo "export KUBECONFIG=$kubeconfig PATH=$cbin:$tools:\$PATH" ;;
  *) echo "usage: $0 up|images|prepare|down|status|kubeconfig|env" >&2; exit 2 ;;
esac
