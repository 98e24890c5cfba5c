#!/usr/bin/env bash
# Builds kube-apiserver, kubectl, etcd and helm from the Go module proxy into a
# versioned cache outside the repo, and reuses that cache when it is whole.
#
# Kubernetes and etcd cannot be `go install`ed: their go.mod files replace
# in-repo staging modules with local paths. So each is built from a small
# wrapper module whose replace list points those modules at their published
# versions, generated from the real go.mod.
#
# Prints progress on stderr and, last on stdout, the bin directory.
# With --check it only says (exit status) whether the cache is whole.
# With `promtool` it builds Prometheus's promtool instead (for the chart's alert tests),
# cached the same way in a directory of its own.
set -euo pipefail

TOOLSET=control-plane
CHECK_ONLY=false
for arg in "$@"; do
  case "$arg" in
    --check) CHECK_ONLY=true ;;
    control-plane | promtool) TOOLSET="$arg" ;;
    *) echo "usage: $0 [control-plane|promtool] [--check]" >&2; exit 2 ;;
  esac
done

K8S_VERSION="${MAILRELAY_K8S_VERSION:-1.36.3}"
ETCD_VERSION="${MAILRELAY_ETCD_VERSION:-3.6.16}"
HELM_VERSION="${MAILRELAY_HELM_VERSION:-3.22.0}"
CACHE_ROOT="${MAILRELAY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mailrelay}"
PROMETHEUS_VERSION="${MAILRELAY_PROMETHEUS_VERSION:-3.16.0}"
if [[ "$TOOLSET" == promtool ]]; then
  DEST="$CACHE_ROOT/promtool-v${PROMETHEUS_VERSION}"
  BINARIES=(promtool)
else
  DEST="$CACHE_ROOT/k8s-v${K8S_VERSION}-etcd-v${ETCD_VERSION}-helm-v${HELM_VERSION}"
  BINARIES=(kube-apiserver kubectl etcd helm)
fi
BIN="$DEST/bin"
STAMP="$DEST/complete.sha256"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false

log() { printf '[control-plane] %s\n' "$*" >&2; }

# Output is captured before matching: `cmd | grep -q` under pipefail fails at random when
# grep exits early and the command dies of SIGPIPE, which would throw away a good cache.
output_of() { "$@" 2>&1 || true; }

cache_is_whole() {
  [[ -f "$STAMP" ]] || return 1
  (cd "$BIN" && sha256sum --quiet --check "$STAMP") >/dev/null 2>&1 || return 1
  if [[ "$TOOLSET" == promtool ]]; then
    [[ "$(output_of "$BIN/promtool" --version)" == *"version ${PROMETHEUS_VERSION} "* ]] || return 1
    return 0
  fi
  [[ "$(output_of "$BIN/kube-apiserver" --version)" == "Kubernetes v${K8S_VERSION}" ]] || return 1
  [[ "$(output_of "$BIN/kubectl" version --client)" == *"v${K8S_VERSION}"* ]] || return 1
  [[ "$(output_of "$BIN/etcd" --version)" == *"etcd Version: ${ETCD_VERSION}"* ]] || return 1
  [[ "$(output_of "$BIN/helm" version --short)" == *"v${HELM_VERSION}"* ]] || return 1
}

if cache_is_whole; then
  echo "$BIN"
  exit 0
fi
if ! $CHECK_ONLY; then
  # Concurrent test runs share the cache: one builds, the others wait and then reuse it.
  mkdir -p "$CACHE_ROOT"
  exec 9>"$CACHE_ROOT/.${TOOLSET}.lock"
  if ! flock --nonblock 9; then
    log "Another build of ${TOOLSET} is running; waiting for it..."
    flock 9
  fi
  if cache_is_whole; then
    echo "$BIN"
    exit 0
  fi
fi
if $CHECK_ONLY; then
  log "No whole cache at $DEST."
  exit 1
fi

command -v go >/dev/null || { log "Go is required (https://go.dev); none found on PATH."; exit 1; }
if [[ -d "$DEST" ]]; then
  log "Found an incomplete or broken cache at $DEST; rebuilding it."
  rm -rf "$DEST"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mailrelay-cp-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/bin"

# replace_lines MODULE@VERSION PATH_PREFIX TARGET_VERSION: turns `mod => ./local/path`
# replace lines of MODULE's go.mod into `mod => mod TARGET_VERSION`.
replace_lines() {
  local gomod
  gomod="$(go mod download -json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  grep -E '^\s*[^ ]+ => \.\.?/' "$gomod" | awk -v v="$2" '{print "replace " $1 " => " $1 " " v}'
}

godebug_block() {
  local gomod
  gomod="$(go mod download -json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  awk '/^godebug \(/{p=1} p{print} p&&/^\)/{exit} /^godebug [^(]/{print}' "$gomod"
}

build_kubernetes() {
  local dir="$WORK/k8s" minor="${K8S_VERSION#*.}"
  minor="${minor%%.*}"
  mkdir -p "$dir"
  log "Resolving k8s.io/kubernetes v${K8S_VERSION} and its staging modules (v0.${K8S_VERSION#*.})..."
  {
    echo "module mailrelay.local/k8sbuild"
    echo
    echo "go 1.25"
    echo
    echo "require k8s.io/kubernetes v${K8S_VERSION}"
    echo
    godebug_block "k8s.io/kubernetes@v${K8S_VERSION}"
    replace_lines "k8s.io/kubernetes@v${K8S_VERSION}" "v0.${K8S_VERSION#*.}"
  } >"$dir/go.mod"
  local pkgs=(component-base/version client-go/pkg/version)
  local ldflags="-s -w"
  for p in "${pkgs[@]}"; do
    ldflags+=" -X k8s.io/$p.gitVersion=v${K8S_VERSION} -X k8s.io/$p.gitMajor=1 -X k8s.io/$p.gitMinor=${minor}"
    ldflags+=" -X k8s.io/$p.gitTreeState=clean -X k8s.io/$p.buildDate=1970-01-01T00:00:00Z"
  done
  log "Building kube-apiserver and kubectl v${K8S_VERSION} (the slow part: 10-25 minutes on 2 cores)..."
  (cd "$dir" && go build -mod=mod -trimpath -ldflags "$ldflags" -o "$WORK/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  local dir="$WORK/etcd"
  mkdir -p "$dir"
  log "Building etcd v${ETCD_VERSION}..."
  {
    echo "module mailrelay.local/etcdbuild"
    echo
    echo "go 1.24"
    echo
    echo "require go.etcd.io/etcd/server/v3 v${ETCD_VERSION}"
    echo
    replace_lines "go.etcd.io/etcd/server/v3@v${ETCD_VERSION}" "v${ETCD_VERSION}"
  } >"$dir/go.mod"
  (cd "$dir" && go build -mod=mod -trimpath -ldflags "-s -w" -o "$WORK/bin/etcd" go.etcd.io/etcd/server/v3)
}

build_helm() {
  log "Building helm v${HELM_VERSION}..."
  local major="${HELM_VERSION%%.*}"
  local ldflags="-s -w -X helm.sh/helm/v${major}/internal/version.version=v${HELM_VERSION} -X helm.sh/helm/v${major}/internal/version.gitTreeState=clean"
  GOBIN="$WORK/bin" go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v${major}/cmd/helm@v${HELM_VERSION}"
}

build_promtool() {
  # Prometheus 3.x publishes its Go module as v0.3XX.Y for release 3.XX.Y.
  local minor="${PROMETHEUS_VERSION#*.}" patch="${PROMETHEUS_VERSION##*.}"
  minor="${minor%%.*}"
  local module_version="v0.$((300 + minor)).${patch}"
  local ldflags="-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION}"
  ldflags+=" -X github.com/prometheus/common/version.Branch=release"
  log "Building promtool ${PROMETHEUS_VERSION} (module ${module_version}; about 5 minutes on 2 cores)..."
  GOBIN="$WORK/bin" go install -trimpath -ldflags "$ldflags" \
    "github.com/prometheus/prometheus/cmd/promtool@${module_version}"
}

start=$SECONDS
if [[ "$TOOLSET" == promtool ]]; then
  build_promtool
else
  build_etcd
  build_helm
  build_kubernetes
fi
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
log "Built ${TOOLSET} in $((SECONDS - start))s into $BIN"
echo "$BIN"
