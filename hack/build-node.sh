#!/usr/bin/env bash
# Builds what a real single-node cluster needs beyond the control plane, into a
# versioned cache outside the repo, and reuses that cache when it is whole:
#   kubelet, kube-controller-manager, kube-scheduler, kube-proxy (Kubernetes, built
#   with the same wrapper go.mod as kube-apiserver in build-control-plane.sh),
#   containerd 2 with its runc shim and ctr, CoreDNS, Rancher's local-path-provisioner
#   (PVCs as real directories), and a static `pause` program for the pod sandbox image.
# It also installs, only when missing, the Debian packages the node uses: runc,
# containernetworking-plugins, iptables, conntrack, podman, debootstrap.
#
# Prints progress on stderr and, last on stdout, the bin directory.
# With --check it only says (exit status) whether the cache is whole.
# Cold: about 12-20 minutes on 2 cores (kubelet alone ~5); warm: under a second.
set -euo pipefail

CHECK_ONLY=false
for arg in "$@"; do
  case "$arg" in
    --check) CHECK_ONLY=true ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
  esac
done

K8S_VERSION="${MAILRELAY_K8S_VERSION:-1.36.3}"
CONTAINERD_VERSION="${MAILRELAY_CONTAINERD_VERSION:-2.4.2}"
COREDNS_VERSION="${MAILRELAY_COREDNS_VERSION:-1.15.0}"
LPP_VERSION="${MAILRELAY_LOCAL_PATH_VERSION:-0.0.30}"
CACHE_ROOT="${MAILRELAY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mailrelay}"
DEST="$CACHE_ROOT/node-k8s-v${K8S_VERSION}-containerd-v${CONTAINERD_VERSION}-coredns-v${COREDNS_VERSION}-lpp-v${LPP_VERSION}"
BIN="$DEST/bin"
STAMP="$DEST/complete.sha256"
BINARIES=(kubelet kube-controller-manager kube-scheduler kube-proxy containerd
  containerd-shim-runc-v2 ctr coredns local-path-provisioner pause)
DEBIAN_PACKAGES=(runc containernetworking-plugins iptables conntrack podman debootstrap)

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false

log() { printf '[node] %s\n' "$*" >&2; }
output_of() { "$@" 2>&1 || true; }

packages_missing() {
  local p missing=()
  for p in "${DEBIAN_PACKAGES[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == "install ok installed" ]] ||
      missing+=("$p")
  done
  echo "${missing[*]}"
}

cache_is_whole() {
  [[ -f "$STAMP" ]] || return 1
  (cd "$BIN" && sha256sum --quiet --check "$STAMP") >/dev/null 2>&1 || return 1
  local b
  for b in kubelet kube-controller-manager kube-scheduler kube-proxy; do
    [[ "$(output_of "$BIN/$b" --version)" == "Kubernetes v${K8S_VERSION}" ]] || return 1
  done
  [[ "$(output_of "$BIN/containerd" --version)" == *" v${CONTAINERD_VERSION} "* ]] || return 1
  [[ "$(output_of "$BIN/coredns" -version)" == *"CoreDNS-${COREDNS_VERSION}"* ]] || return 1
  [[ -z "$(packages_missing)" ]] || return 1
}

if cache_is_whole; then
  echo "$BIN"
  exit 0
fi
if $CHECK_ONLY; then
  log "No whole node cache at $DEST (or Debian packages missing: $(packages_missing))."
  exit 1
fi
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.node.lock"
if ! flock --nonblock 9; then
  log "Another build of the node binaries is running; waiting for it..."
  flock 9
fi
if cache_is_whole; then
  echo "$BIN"
  exit 0
fi

start=$SECONDS
missing="$(packages_missing)"
if [[ -n "$missing" ]]; then
  log "Installing Debian packages: $missing (about 1-2 minutes)..."
  if [[ $EUID -ne 0 ]]; then
    log "Installing them needs root: run  sudo apt-get install -y $missing"
    exit 1
  fi
  apt-get update -qq >&2
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2
fi

if [[ -f "$STAMP" ]] && (cd "$BIN" && sha256sum --quiet --check "$STAMP") >/dev/null 2>&1; then
  # Only the packages were missing.
  cache_is_whole && { echo "$BIN"; exit 0; }
fi

command -v go >/dev/null || { log "Go is required (https://go.dev); none found on PATH."; exit 1; }
if [[ -d "$DEST" ]]; then
  log "Found an incomplete or broken cache at $DEST; rebuilding it."
  rm -rf "$DEST"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mailrelay-node-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/bin"

gomod_of() {
  go mod download -json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])'
}

build_kubernetes() {
  local dir="$WORK/k8s" minor="${K8S_VERSION#*.}" gomod
  minor="${minor%%.*}"
  mkdir -p "$dir"
  log "Resolving k8s.io/kubernetes v${K8S_VERSION} and its staging modules..."
  gomod="$(gomod_of "k8s.io/kubernetes@v${K8S_VERSION}")"
  {
    echo "module mailrelay.local/k8snodebuild"
    echo
    echo "go 1.25"
    echo
    echo "require k8s.io/kubernetes v${K8S_VERSION}"
    echo
    awk '/^godebug \(/{p=1} p{print} p&&/^\)/{exit} /^godebug [^(]/{print}' "$gomod"
    grep -E '^\s*[^ ]+ => \.\.?/' "$gomod" |
      awk -v v="v0.${K8S_VERSION#*.}" '{print "replace " $1 " => " $1 " " v}'
  } >"$dir/go.mod"
  local ldflags="-s -w" p
  for p in component-base/version client-go/pkg/version; do
    ldflags+=" -X k8s.io/$p.gitVersion=v${K8S_VERSION} -X k8s.io/$p.gitMajor=1 -X k8s.io/$p.gitMinor=${minor}"
    ldflags+=" -X k8s.io/$p.gitTreeState=clean -X k8s.io/$p.buildDate=1970-01-01T00:00:00Z"
  done
  log "Building kubelet, kube-controller-manager, kube-scheduler, kube-proxy v${K8S_VERSION} (the slow part: 8-15 minutes on 2 cores)..."
  (cd "$dir" && go build -mod=mod -trimpath -ldflags "$ldflags" -o "$WORK/bin/" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy)
}

build_containerd() {
  log "Building containerd, containerd-shim-runc-v2, ctr v${CONTAINERD_VERSION} (about 3 minutes)..."
  local m=github.com/containerd/containerd/v2
  GOBIN="$WORK/bin" go install -trimpath \
    -ldflags "-s -w -X $m/version.Version=v${CONTAINERD_VERSION} -X $m/version.Revision=release" \
    "$m/cmd/containerd@v${CONTAINERD_VERSION}" "$m/cmd/containerd-shim-runc-v2@v${CONTAINERD_VERSION}" \
    "$m/cmd/ctr@v${CONTAINERD_VERSION}"
}

build_coredns() {
  log "Building CoreDNS v${COREDNS_VERSION} (about 2 minutes)..."
  GOBIN="$WORK/bin" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@v${COREDNS_VERSION}"
}

build_local_path_provisioner() {
  log "Building local-path-provisioner v${LPP_VERSION} (about 1 minute)..."
  GOBIN="$WORK/bin" go install -trimpath -ldflags "-s -w -X main.VERSION=v${LPP_VERSION}" \
    "github.com/rancher/local-path-provisioner@v${LPP_VERSION}"
}

build_pause() {
  # The pod sandbox only has to hold the namespaces: sleep until SIGTERM/SIGINT, reap children.
  local dir="$WORK/pause"
  mkdir -p "$dir"
  cat >"$dir/main.go" <<'EOF'
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			for {
				var status syscall.WaitStatus
				if pid, _ := syscall.Wait4(-1, &status, syscall.WNOHANG, nil); pid <= 0 {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
EOF
  printf 'module mailrelay.local/pause\n\ngo 1.24\n' >"$dir/go.mod"
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$WORK/bin/pause" .)
}

build_containerd
build_coredns
build_local_path_provisioner
build_pause
build_kubernetes
mkdir -p "$BIN"
for b in "${BINARIES[@]}"; do
  install -m 0755 "$WORK/bin/$b" "$BIN/$b"
done
(cd "$BIN" && sha256sum "${BINARIES[@]}" >"$STAMP")
if ! cache_is_whole; then
  log "Built binaries failed their version check; see the output above."
  rm -rf "$DEST"
  exit 1
fi
log "Built the node binaries in $((SECONDS - start))s into $BIN"
echo "$BIN"
