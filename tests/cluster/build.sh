#!/usr/bin/env bash
# Build (or reuse) the pinned control-plane binaries: kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, kwok, kwokctl, helm. Output goes to a cache folder keyed by the
# pinned versions, outside the work tree so clean clones (CI) reuse it; a second run builds nothing.
# Prints the bin directory on its last line.
#
#   build.sh          the control plane (above)
#   build.sh kueue    the Kueue manager ($KUEUE_VERSION) plus its CRDs and webhook manifests, copied
#                     from the same module, into a folder of their own (its path printed last)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=/dev/null
source "$here/versions.env"
cache="${LLMRAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmray}"
bin="$cache/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS="-trimpath" GOTOOLCHAIN=local

log() { echo "[build] $*" >&2; }
need() { for b in "$@"; do [ -x "$bin/$b" ] || return 0; done; return 1; }

if [ "${1:-}" = kueue ]; then
  # The manager from its Go module (no replace directives, so `go install mod@version` builds it as
  # released); CRDs and webhook manifests from the very module the binary was built from.
  kbin="$cache/bin/kueue-$KUEUE_VERSION"
  if [ ! -x "$kbin/kueue" ] || [ ! -s "$kbin/webhook-manifests.yaml" ]; then
    log "installing kueue $KUEUE_VERSION"
    t0=$SECONDS
    rm -rf "$kbin.tmp" && mkdir -p "$kbin.tmp"
    GOBIN="$kbin.tmp" go install -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
      "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
    mod="$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [ -d "$mod/config/components/crd/bases" ] || { log "kueue module not found (got '$mod')"; exit 1; }
    mkdir -p "$kbin.tmp/crds"
    cp -r "$mod"/config/components/crd/bases "$mod"/config/components/crd/patches \
      "$mod"/config/components/crd/kustomization.yaml "$kbin.tmp/crds/"
    cp "$mod/config/components/webhook/manifests.yaml" "$kbin.tmp/webhook-manifests.yaml"
    chmod -R u+w "$kbin.tmp"
    rm -rf "$kbin" && mv "$kbin.tmp" "$kbin"
    log "kueue $KUEUE_VERSION ready in $((SECONDS - t0))s"
  fi
  echo "$kbin"
  exit 0
fi

if need kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  log "building Kubernetes $KUBE_VERSION (first build takes a while on 2 cores)"
  minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  ld="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
  ld="$ld -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  ld="$ld -X k8s.io/component-base/version.gitTreeState=clean"
  ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
  ld="$ld -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  (cd "$here/build/kubernetes" && go build -ldflags "$ld" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
fi
if need etcd; then
  log "building etcd $ETCD_VERSION"
  (cd "$here/build/etcd" && go build -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
fi
if need kwok kwokctl; then
  log "installing kwok $KWOK_VERSION"
  GOBIN="$bin" go install -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${KUBE_VERSION#v}" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
fi
if need helm; then
  log "installing helm $HELM_VERSION"
  GOBIN="$bin" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
echo "$bin"
