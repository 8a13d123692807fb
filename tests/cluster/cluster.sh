#!/usr/bin/env bash
# The llmray local Kubernetes control plane: real etcd, kube-apiserver, kube-controller-manager and
# kube-scheduler (built from Go modules by build.sh), with kwok playing the kubelets of simulated
# CPU and GPU nodes. Everything listens on 127.0.0.1 and nothing is downloaded at run time.
#
#   cluster.sh up          build/reuse the binaries, start the cluster (no-op when healthy), add nodes,
#                          print `export KUBECONFIG=...` on stdout
#   cluster.sh down        stop every process of the cluster and remove .cache/cluster
#   cluster.sh status      exit 0 and show the nodes when healthy, exit 3 when not running
#   cluster.sh kubeconfig  print the kubeconfig path
#
# Env: GPU_NODES (default 4), CPU_NODES (default 2) set the number of simulated nodes (`up` on a
# running cluster adds/removes nodes to match); LLMRAY_CLUSTER_DIR moves the state folder.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=/dev/null
source "$here/versions.env"

name=llmray
state="${LLMRAY_CLUSTER_DIR:-$repo/.cache/cluster}"
kubeconfig="$state/kubeconfig"
export KWOK_WORKDIR="$state/kwok"   # kwokctl keeps config, pki, etcd data, logs and pids under here
workdir="$KWOK_WORKDIR/clusters/$name"
gpu_nodes="${GPU_NODES:-4}"
cpu_nodes="${CPU_NODES:-2}"

# Same folder build.sh prints; computed here too so that `down`/`status` never trigger a build.
cache="${LLMRAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmray}"
bin="$cache/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"

log() { echo "[cluster] $*" >&2; }
die() { echo "[cluster] ERROR: $*" >&2; exit 1; }

kubectl() { "$bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }

healthy() {
  [ -s "$kubeconfig" ] && [ -x "$bin/kubectl" ] &&
    kubectl --request-timeout=3s get --raw=/readyz >/dev/null 2>&1
}

render_nodes() {
  local i
  for ((i = 0; i < cpu_nodes; i++)); do
    echo "---"; sed "s/__INDEX__/$i/g; s/__KUBE_VERSION__/$KUBE_VERSION/g" "$here/node-cpu.yaml"
  done
  for ((i = 0; i < gpu_nodes; i++)); do
    echo "---"; sed "s/__INDEX__/$i/g; s/__KUBE_VERSION__/$KUBE_VERSION/g" "$here/node-gpu.yaml"
  done
}

ensure_nodes() {
  local want have extra n
  want="$( (for ((n = 0; n < cpu_nodes; n++)); do echo "node/llmray-cpu-$n"; done
            for ((n = 0; n < gpu_nodes; n++)); do echo "node/llmray-gpu-$n"; done) | sort)"
  have="$(kubectl get nodes -l llmray.io/simulated=true -o name | sort)"
  if [ "$want" != "$have" ]; then
    extra="$(comm -13 <(echo "$want") <(echo "$have"))"
    if [ -n "$extra" ]; then
      log "removing nodes: $(echo "$extra" | tr '\n' ' ')"
      # shellcheck disable=SC2086
      kubectl delete --wait=false $extra >/dev/null
    fi
    log "applying $cpu_nodes CPU and $gpu_nodes GPU nodes"
    render_nodes | kubectl apply -f - >/dev/null
  fi
  if [ $((cpu_nodes + gpu_nodes)) -gt 0 ]; then
    kubectl wait --for=condition=Ready node -l llmray.io/simulated=true --timeout=120s >/dev/null
  fi
}

# Pids of processes started from this cluster's workdir (kwokctl writes one pid file per component).
cluster_pids() {
  local f pid
  for f in "$workdir"/pids/*.pid; do
    [ -f "$f" ] || continue
    pid="$(cat "$f" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    # only if it is alive and really one of ours (its command line names our workdir)
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$workdir"; then
      echo "$pid"
    fi
  done
}

cmd_down() {
  local pids pid i
  if [ -d "$workdir" ]; then
    pids="$(cluster_pids)"
    if [ -x "$bin/kwokctl" ]; then
      log "stopping cluster $name"
      "$bin/kwokctl" --name "$name" delete cluster --kubeconfig "$kubeconfig" >&2 || log "kwokctl delete failed; killing by pid"
    fi
    # Anything kwokctl left behind: TERM, then KILL after a grace period.
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for i in $(seq 1 50); do
      alive=""
      for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
      [ -z "$alive" ] && break
      sleep 0.1  # bounded wait for process exit (no condition to subscribe to)
    done
    for pid in ${alive:-}; do log "killing $pid"; kill -KILL "$pid" 2>/dev/null || true; done
  fi
  rm -rf "$state"
  log "down (removed $state)"
}

cmd_up() {
  local t0 args i
  t0=${EPOCHREALTIME/./}
  bin="$(bash "$here/build.sh" | tail -n1)"
  [ -x "$bin/kwokctl" ] || die "build.sh did not produce $bin/kwokctl"

  # Processes alive but the API server slow to answer (e.g. just started): give it a moment.
  if ! healthy && [ -n "$(cluster_pids)" ]; then
    for i in $(seq 1 30); do healthy && break; sleep 0.5; done  # bounded readiness poll
  fi
  if healthy; then
    log "cluster $name already running"
  else
    if [ -d "$state" ]; then
      log "stale or unhealthy cluster state in $state: recreating"
      cmd_down
    fi
    mkdir -p "$state"
    args=(
      --config "$here/kwokctl.yaml"
      --name "$name"
      create cluster
      --runtime binary
      --kube-apiserver-binary "$bin/kube-apiserver"
      --kube-controller-manager-binary "$bin/kube-controller-manager"
      --kube-scheduler-binary "$bin/kube-scheduler"
      --etcd-binary "$bin/etcd"
      --kwok-controller-binary "$bin/kwok"
      --kube-authorization
      --kube-admission
      --secure-port
      --quiet-pull
      --kubeconfig "$kubeconfig"
      --wait 2m
      --timeout 4m
    )
    log "creating cluster $name (Kubernetes $KUBE_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION)"
    # kubectl has no flag: its path goes by env. PATH first holds our bin dir so that kwokctl's own
    # kubectl look-ups (health checks) find the pinned binary and never download one.
    if ! PATH="$bin:$PATH" KWOK_KUBECTL_BINARY="$bin/kubectl" \
      KWOK_KUBE_VERSION="$KUBE_VERSION" KWOK_ETCD_VERSION="${ETCD_VERSION#v}" \
      "$bin/kwokctl" "${args[@]}" >&2; then
      for f in "$workdir"/logs/*.log; do [ -f "$f" ] && { log "--- tail $f"; tail -n 20 "$f" >&2; }; done
      die "kwokctl create cluster failed (state kept in $state for inspection; run '$0 down' to clean)"
    fi
    healthy || die "cluster created but /readyz does not answer; logs in $workdir/logs"
    # Pods can only be admitted once the ServiceAccount controller made the default account.
    kubectl wait --for=create serviceaccount/default -n default --timeout=60s >/dev/null
  fi
  ensure_nodes
  local ms=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
  log "ready in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s; nodes: $cpu_nodes cpu, $gpu_nodes gpu"
  echo "export KUBECONFIG=$kubeconfig"
}

cmd_status() {
  if healthy; then
    echo "running: $(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
    echo "export KUBECONFIG=$kubeconfig"
    kubectl get nodes -L llmray.io/node-pool,nvidia.com/gpu.product
  else
    echo "not running"
    return 3
  fi
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  kubeconfig) echo "$kubeconfig" ;;
  *) echo "usage: $0 up|down|status|kubeconfig" >&2; exit 2 ;;
esac
