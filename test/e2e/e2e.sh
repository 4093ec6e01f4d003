#!/usr/bin/env bash
# End to end on a real Kubernetes: the image, `helm install` of charts/nbd-csi, then what users do
# with kubectl alone (PVCs, pods, snapshots, restores, clones, expansion, raw block, a node plugin
# restart under fio), the volume health the controller reports while a datapath is frozen, and a
# check that deleting everything leaves nothing behind.
#
#   test/e2e/e2e.sh                  the bundled single-node cluster (../shared/k8s, relative to
#                                    the repository root): set up, started and stopped by the test
#   KUBECONFIG=... test/e2e/e2e.sh   any cluster you give it (kind, ...): nothing is started or
#                                    stopped; the images must reach its nodes, e.g.
#     E2E_LOAD='kind load image-archive' KUBECONFIG=~/.kube/config test/e2e/e2e.sh
#
# Environment: E2E_LOAD      command run with each image archive as last argument (bundled
#                            default: ctr -n k8s.io images import)
#              E2E_VALUES    extra values file for helm (after the test's own)
#              E2E_KEEP=1    leave the release and the workloads installed at the end
#              E2E_WORKDIR   logs, state and the image archives (default build/e2e)
# Exit 0: every step passed (steps that cannot run on this cluster are listed as NOT APPLICABLE
# or NOT EXERCISED with the reason); 1: a step failed; 77: no cluster here (a failure with
# CI=true).
set -euo pipefail
src=${NBDCSI_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}
bin=${NBDCSI_BIN:-$src/build/bin}
here=$src/test/e2e
work=${E2E_WORKDIR:-$(dirname "$bin")/e2e}
NS=nbd-csi-e2e            # the driver (values-bundled.yaml names its controller Service)
APPS=nbd-csi-e2e-apps     # the workloads
RELEASE=nbd-csi
DRIVER=nbd.csi.io
t_start=$SECONDS

skip_or_fail() {
  if [ "${CI:-}" = true ]; then echo "e2e: FAIL: $*" >&2; exit 1; fi
  echo "e2e: SKIP: $*" >&2
  exit 77
}
log() { echo "e2e: $*"; }
die() { echo "e2e: FAIL: $*" >&2; exit 1; }

mkdir -p "$work"
state=$work/state
rm -rf "$state" && mkdir -p "$state"
put() { printf '%s\n' "$2" >"$state/$1"; }
get() { cat "$state/$1" 2>/dev/null || { echo "e2e: no $1 (an earlier step failed)" >&2; return 1; }; }

# ---------------------------------------------------------------------------------------------
# The cluster
mode=external
if [ -z "${KUBECONFIG:-}" ]; then
  mode=bundled
  # ../shared/k8s from the repository root; from a git worktree, from the main checkout's root.
  k8s=${NBDCSI_K8S_DIR:-$(cd "$src/.." && pwd)/shared/k8s}
  if [ ! -x "$k8s/start-cluster.sh" ] && [ -z "${NBDCSI_K8S_DIR:-}" ]; then
    common=$(git -C "$src" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
    [ -n "$common" ] && [ -x "$(dirname "$(dirname "$common")")/shared/k8s/start-cluster.sh" ] &&
      k8s=$(dirname "$(dirname "$common")")/shared/k8s
  fi
  [ -x "$k8s/start-cluster.sh" ] ||
    skip_or_fail "no bundled cluster at $k8s (../shared/k8s from the repository root, or NBDCSI_K8S_DIR); set KUBECONFIG to run against another cluster"
  [ "$(id -u)" = 0 ] || skip_or_fail "the bundled cluster needs root"
  export K8S_BIN=${K8S_BIN:-/opt/nbd-csi-k8s/bin} K8S_TOP=${K8S_TOP:-/var/tmp/nbd-csi-k8s}
  export PATH=$K8S_BIN:$PATH
fi
helm=$("$src/scripts/get-helm.sh" 2>"$work/get-helm.err") || skip_or_fail "no helm: $(cat "$work/get-helm.err")"
for t in python3 umoci skopeo; do
  command -v $t >/dev/null || "$src/scripts/deps.sh" image >/dev/null
  command -v $t >/dev/null || skip_or_fail "needs $t (scripts/deps.sh image)"
done

started_cluster=
snapctl_pid=
s3_pid=
cleanup() {
  local rc=$?
  set +e
  if [ $rc -ne 0 ] && command -v kubectl >/dev/null && [ -n "${KUBECONFIG:-}" ]; then diagnostics; fi
  if [ "${E2E_KEEP:-}" != 1 ] && [ -n "${KUBECONFIG:-}" ]; then
    timeout 120 kubectl delete namespace "$APPS" --ignore-not-found --wait=true >/dev/null 2>&1
    timeout 120 "$helm" uninstall "$RELEASE" -n "$NS" --wait >/dev/null 2>&1
    timeout 120 kubectl delete namespace "$NS" --ignore-not-found --wait=true >/dev/null 2>&1
  fi
  if [ -n "$snapctl_pid" ]; then kill "$snapctl_pid" 2>/dev/null; rm -f "$K8S_TOP/run/pids/e2e-snapshot-controller.pid"; fi
  [ -n "$s3_pid" ] && kill "$s3_pid" 2>/dev/null
  if [ -n "$started_cluster" ] && [ "${E2E_KEEP:-}" != 1 ]; then
    if WIPE=1 "$k8s/stop-cluster.sh" >"$work/stop-cluster.log" 2>&1; then
      rm -f "$marker"
    else
      echo "e2e: stop-cluster.sh failed (see $work/stop-cluster.log)"
    fi
  fi
  [ $rc -eq 0 ] || echo "e2e: logs and state in $work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ $mode = bundled ]; then
  log "bundled cluster: $k8s (setup.sh, start-cluster.sh)"
  "$k8s/setup.sh" >"$work/setup.log" 2>&1 || { tail -20 "$work/setup.log"; die "setup.sh failed"; }
  # A cluster this test started is stopped at the end, also when an earlier run was killed
  # before it could stop it (the marker says so); one started by someone else is left running.
  apiserver_pid=$K8S_TOP/run/pids/kube-apiserver.pid
  marker=$K8S_TOP/run/started-by-nbd-csi-e2e
  if ! { [ -f "$apiserver_pid" ] && kill -0 "$(cat "$apiserver_pid")" 2>/dev/null; } || [ -f "$marker" ]; then
    started_cluster=1
  fi
  t0=$SECONDS
  "$k8s/start-cluster.sh" >"$work/start-cluster.log" 2>&1 ||
    { tail -20 "$work/start-cluster.log"; die "start-cluster.sh failed"; }
  [ -n "$started_cluster" ] && touch "$marker"
  export KUBECONFIG=$K8S_TOP/run/admin.kubeconfig
  log "cluster up in $((SECONDS - t0)) s${started_cluster:+ (started by this test, stopped at the end)}"
fi
command -v kubectl >/dev/null || die "no kubectl on PATH"
kubectl version --short >"$work/version.txt" 2>/dev/null || kubectl version >"$work/version.txt"
server_version=$(kubectl get --raw /version | python3 -c 'import json,sys; print(json.load(sys.stdin)["gitVersion"])')
log "Kubernetes $server_version"

# What the API server serves decides which steps can run.
served() {  # group/version resource
  kubectl get --raw "/apis/$1" 2>/dev/null | python3 2>/dev/null -c '
import json, sys
d = json.load(sys.stdin)
sys.exit(0 if any(r["name"] == sys.argv[1] for r in d.get("resources", [])) else 1)' "$2"
}
has_capacity=; served storage.k8s.io/v1 csistoragecapacities && has_capacity=1
has_vac=; served storage.k8s.io/v1beta1 volumeattributesclasses && has_vac=v1beta1
served storage.k8s.io/v1 volumeattributesclasses && has_vac=v1
has_pdb_v1=; served policy/v1 poddisruptionbudgets && has_pdb_v1=1

# poll DESCRIPTION SECONDS COMMAND...: bounded waiting; the last output is kept for the message.
poll() {
  local d=$1 t=$2 i; shift 2
  for ((i = 0; i < t; i++)); do
    if "$@" >"$state/.poll" 2>&1; then return 0; fi
    sleep 1
  done
  echo "e2e: timed out after ${t}s: $d: $(tail -c 400 "$state/.poll")" >&2
  return 1
}

save_logs() {  # every container of the driver, for reading after the run
  mkdir -p "$work/logs"
  rm -f "$work/logs"/*.log
  local p c
  for p in $(kubectl -n "$NS" get pods -o jsonpath='{.items[*].metadata.name}' 2>/dev/null); do
    for c in $(kubectl -n "$NS" get pod "$p" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}'); do
      kubectl -n "$NS" logs "$p" -c "$c" --timestamps >"$work/logs/$p.$c.log" 2>&1
      kubectl -n "$NS" logs "$p" -c "$c" --timestamps --previous >"$work/logs/$p.$c.previous.log" 2>/dev/null ||
        rm -f "$work/logs/$p.$c.previous.log"
    done
  done
  [ $mode = bundled ] && cp "$work/snapshot-controller.log" "$work/logs/" 2>/dev/null
  log "driver logs in $work/logs"
}

diagnostics() {
  local f=$work/diagnostics.txt
  {
    echo "== pods"; kubectl get pods -A -o wide
    echo "== pvc/pv"; kubectl get pvc -A -o wide; kubectl get pv -o wide
    echo "== volumesnapshots"; kubectl get volumesnapshots,volumesnapshotcontents -A 2>/dev/null
    echo "== events"; kubectl get events -A --sort-by=.lastTimestamp | tail -60
    for p in $(kubectl -n "$NS" get pods -o name 2>/dev/null); do
      echo "== describe $p"; kubectl -n "$NS" describe "$p" | tail -30
      for c in $(kubectl -n "$NS" get "$p" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}'); do
        echo "== logs $p $c"; kubectl -n "$NS" logs "$p" -c "$c" --tail=80
        echo "== previous logs $p $c"; kubectl -n "$NS" logs "$p" -c "$c" --previous --tail=40 2>/dev/null
      done
    done
    for p in $(kubectl -n "$APPS" get pods -o name 2>/dev/null); do
      echo "== describe $p"; kubectl -n "$APPS" describe "$p" | tail -20
    done
  } >"$f" 2>&1
  echo "e2e: diagnostics in $f; the last events:"
  grep -A25 '^== events' "$f" | tail -25
}

# ---------------------------------------------------------------------------------------------
# Steps: each runs in a subshell with set -e, so one failing step is reported (FAILED with its
# reason) and the independent ones after it still run. Values pass between steps through put/get.
results=()
failed=0
step() {  # "title" function
  local title=$1 fn=$2 t0=$SECONDS rc=0
  echo
  log "[$((${#results[@]} + 1))] $title"
  ( set -euo pipefail; "$fn" ) >"$state/.out" 2>&1 || rc=$?
  sed 's/^/      /' "$state/.out"
  local secs=$((SECONDS - t0)) res
  if [ $rc -eq 0 ]; then
    res=$(cat "$state/.result" 2>/dev/null || echo ok)
  elif [ $rc -eq 3 ]; then
    res="NOT APPLICABLE: $(cat "$state/.result" 2>/dev/null)"
  else
    res="FAILED: $(grep -E '^e2e: ' "$state/.out" | tail -1 | sed 's/^e2e: //' | cut -c1-150)"
    failed=1
    diagnostics >/dev/null 2>&1 || true
    cp "$work/diagnostics.txt" "$work/diagnostics-step$((${#results[@]} + 1)).txt" 2>/dev/null || true
  fi
  rm -f "$state/.result"
  results+=("$(printf '%-3s %-72s %4ss  %s' "$((${#results[@]} + 1))" "$title" "$secs" "$res")")
}
result() { printf '%s\n' "$*" >"$state/.result"; }
not_applicable() { result "$*"; exit 3; }
fail() { echo "e2e: $*" >&2; exit 1; }

# S3 for the backup step: s3rver on the host's loopback, which the datapath pods reach (they use
# the host's network on the bundled cluster). Elsewhere: E2E_S3_ENDPOINT (with E2E_S3_TARGET and
# the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or the backup step is skipped.
s3_dir=
start_s3() {
  s3_endpoint=${E2E_S3_ENDPOINT:-} s3_target=${E2E_S3_TARGET:-s3://e2e/backups}
  s3_key=${AWS_ACCESS_KEY_ID:-S3RVER} s3_secret=${AWS_SECRET_ACCESS_KEY:-S3RVER}
  [ -n "$s3_endpoint" ] && return 0
  [ $mode = bundled ] || return 0
  local s3bin port
  s3bin=$("$src/scripts/get-s3rver.sh" --check 2>/dev/null) || { log "no s3rver: the backup step is skipped"; return 0; }
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  rm -rf "$work/s3" && mkdir -p "$work/s3"
  # s3rver's listing tokens need OpenSSL 3's legacy provider (test/integration/backup_s3.sh).
  NODE_OPTIONS=--openssl-legacy-provider nohup "$s3bin" -d "$work/s3" -a 127.0.0.1 -p "$port" -s \
    --configure-bucket e2e >"$work/s3rver.log" 2>&1 &
  s3_pid=$!
  poll "s3rver listening on $port" 30 python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" ||
    die "s3rver did not start: $(tail -5 "$work/s3rver.log")"
  s3_endpoint=http://127.0.0.1:$port s3_dir=$work/s3/e2e/backups
  log "s3rver on $s3_endpoint (backups to $s3_target)"
}

# ---------------------------------------------------------------------------------------------
# Images
version=$(sed -n 's/^project(nbd-csi VERSION \([0-9.]*\).*/\1/p' "$src/CMakeLists.txt")
archive=$(dirname "$bin")/image/nbd-csi-$version.tar
load() {  # archive
  if [ -n "${E2E_LOAD:-}" ]; then
    $E2E_LOAD "$1" >>"$work/load.log" 2>&1
  elif [ $mode = bundled ]; then
    ctr -n k8s.io images import "$1" >>"$work/load.log" 2>&1
  fi
}

images() {
  # The image of this tree: rebuilt when a binary or the image script is newer than the archive
  # (test/image's image.build makes it first when both run under CTest).
  local rebuild=
  [ -s "$archive" ] || rebuild=1
  for f in "$bin"/nbd-datapathd "$bin"/nbd-csi-controller "$bin"/nbd-csi-node "$bin"/nbdctl "$src/scripts/build-image.sh"; do
    [ "$f" -nt "$archive" ] && rebuild=1
  done
  if [ -n "$rebuild" ]; then
    "$src/scripts/deps.sh" image >/dev/null
    "$src/scripts/build-image.sh" --bin "$bin" --out "$(dirname "$archive")" >"$work/build-image.log" 2>&1 ||
      { tail -20 "$work/build-image.log"; fail "scripts/build-image.sh failed"; }
    tail -1 "$work/build-image.log"
  fi
  load "$archive" || fail "loading $archive failed ($work/load.log)"
  echo "nbd-csi:$version from $archive"
  "$here/images.sh" workload "$work/images" >"$state/workload.img"
  read -r _ image a <"$state/workload.img"
  load "$a" || fail "loading $a failed"
  put workload_image "$image"
  echo "$image (busybox + fio) for the workloads"
  if [ $mode = bundled ]; then
    "$here/images.sh" sidecars "$work/images" "$K8S_BIN" >"$state/sidecars.img"
    while read -r name image a; do
      load "$a" || fail "loading $a failed"
      echo "$image (from $K8S_BIN/$name)"
    done <"$state/sidecars.img"
  fi
}

snapshot_support() {
  if kubectl get crd volumesnapshots.snapshot.storage.k8s.io >/dev/null 2>&1; then
    echo "snapshot CRDs present"
  elif [ $mode = bundled ]; then
    kubectl apply -f "$(dirname "$K8S_BIN")/manifests/snapshot/" >"$state/crds.log" 2>&1 ||
      { cat "$state/crds.log"; fail "cannot install the snapshot CRDs"; }
    poll "snapshot CRDs established" 60 kubectl wait --for=condition=Established --timeout=5s \
      crd/volumesnapshots.snapshot.storage.k8s.io crd/volumesnapshotcontents.snapshot.storage.k8s.io \
      crd/volumesnapshotclasses.snapshot.storage.k8s.io
    echo "snapshot CRDs installed from $(dirname "$K8S_BIN")/manifests/snapshot"
  else
    result "NOT EXERCISED: this cluster has no snapshot CRDs (install kubernetes-csi/external-snapshotter)"
    return 0
  fi
  put snapshots 1
}

start_snapshot_controller() {
  # The bundled cluster has no snapshot-controller; it runs as a host process with the admin
  # kubeconfig (its pid file lets stop-cluster.sh stop it too). Other clusters bring their own.
  [ $mode = bundled ] && [ -n "$(get snapshots 2>/dev/null)" ] || return 0
  pkill_pidfile=$K8S_TOP/run/pids/e2e-snapshot-controller.pid
  if [ -f "$pkill_pidfile" ] && kill -0 "$(cat "$pkill_pidfile")" 2>/dev/null; then
    snapctl_pid=$(cat "$pkill_pidfile")
    return 0
  fi
  nohup "$K8S_BIN/snapshot-controller" --kubeconfig="$KUBECONFIG" --leader-election=false \
    >"$work/snapshot-controller.log" 2>&1 &
  snapctl_pid=$!
  echo $snapctl_pid >"$pkill_pidfile"
  log "snapshot-controller (host process, pid $snapctl_pid)"
}

# ---------------------------------------------------------------------------------------------
# Install
install_chart() {
  # A run killed earlier may have left its release or namespaces: start from nothing.
  if "$helm" status "$RELEASE" -n "$NS" >/dev/null 2>&1; then
    "$helm" uninstall "$RELEASE" -n "$NS" --wait >/dev/null
  fi
  kubectl delete namespace "$APPS" "$NS" --ignore-not-found --wait=true >/dev/null
  if kubectl get csidriver "$DRIVER" >/dev/null 2>&1; then
    fail "CSIDriver $DRIVER exists already: another nbd-csi install is on this cluster; the test needs a cluster without one"
  fi
  if [ $mode = bundled ]; then
    # A run that failed before its clean-up left its volumes in the pool directory on this host.
    local pool
    pool=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["datapath"]["poolDir"])' "$here/values-walk.yaml")
    if [ -d "$pool" ]; then
      echo "removing $(find "$pool" -type f | wc -l) files an earlier run left in $pool"
      rm -rf "$pool"
    fi
  fi
  kubectl create namespace "$NS" >/dev/null
  # The node plugin and the datapath are privileged: the namespace must allow it (Pod Security).
  kubectl label namespace "$NS" pod-security.kubernetes.io/enforce=privileged >/dev/null
  kubectl create namespace "$APPS" >/dev/null
  local args=(-f "$here/values-walk.yaml" --set image.repository=nbd-csi --set "image.tag=$version")
  if [ $mode = bundled ]; then
    args+=(-f "$here/values-bundled.yaml")
    while read -r name image _; do
      case $name in
        csi-provisioner) args+=(--set "sidecars.provisioner.image=$image") ;;
        csi-snapshotter) args+=(--set "sidecars.snapshotter.image=$image") ;;
        csi-resizer) args+=(--set "sidecars.resizer.image=$image") ;;
        csi-node-driver-registrar) args+=(--set "sidecars.nodeDriverRegistrar.image=$image") ;;
        livenessprobe) args+=(--set "sidecars.livenessProbe.image=$image") ;;
      esac
    done <"$state/sidecars.img"
  fi
  [ -n "$has_vac" ] && args+=(--set volumeAttributesClasses.enabled=true --set "volumeAttributesClasses.apiVersion=storage.k8s.io/$has_vac")
  if [ -n "${s3_endpoint:-}" ] && [ -n "$(get snapshots 2>/dev/null)" ]; then
    # The Secret the backup classes name (examples/backup/secret.yaml), then the classes.
    kubectl -n "$NS" create secret generic nbd-csi-backup --from-literal=AWS_ACCESS_KEY_ID="$s3_key" \
      --from-literal=AWS_SECRET_ACCESS_KEY="$s3_secret" --from-literal=AWS_ENDPOINT_URL="$s3_endpoint" \
      --from-literal=AWS_REGION=us-east-1 >/dev/null
    # 8 MiB/s: the 32 MiB the walk writes take seconds, so the snapshotter sees "not ready" first.
    args+=(--set backup.enabled=true --set "backup.target=$s3_target" --set backup.bandwidth=8Mi)
    put backup 1
  fi
  [ -n "${E2E_VALUES:-}" ] && args+=(-f "$E2E_VALUES")
  "$helm" install "$RELEASE" "$src/charts/nbd-csi" -n "$NS" "${args[@]}" >"$work/helm-install.txt" 2>&1 ||
    { cat "$work/helm-install.txt"; fail "helm install failed"; }
  sed -n '/^NOTES:/,$p' "$work/helm-install.txt" | head -3
  # Every node runs a node plugin and a datapath; the controller's replicas come up.
  local want_nodes
  want_nodes=$(kubectl get nodes -o name | wc -l)
  poll "the chart's pods exist" 120 sh -c "
    [ \$(kubectl -n $NS get pods -l app.kubernetes.io/component=datapath -o name | wc -l) -eq $want_nodes ] &&
    [ \$(kubectl -n $NS get pods -l app.kubernetes.io/component=node -o name | wc -l) -eq $want_nodes ] &&
    [ \$(kubectl -n $NS get pods -l app.kubernetes.io/component=controller -o name | wc -l) -ge 1 ]"
  kubectl -n "$NS" wait --for=condition=Ready pod -l app.kubernetes.io/instance=$RELEASE --timeout=240s >/dev/null ||
    fail "the chart's pods are not Ready within 240 s"
  kubectl -n "$NS" get pods -o wide | sed 's/^/  /'
  # The kubelet took the node plugin's registration, and each datapath registered with the
  # controller over mutual TLS (the controller places volumes only on registered nodes).
  local node
  for node in $(kubectl get nodes -o jsonpath='{.items[*].metadata.name}'); do
    poll "CSINode $node lists $DRIVER" 60 sh -c "kubectl get csinode $node -o jsonpath='{.spec.drivers[*].name}' | grep -qw $DRIVER"
    poll "the controller registered node $node" 60 sh -c \
      "kubectl -n $NS logs deploy/$RELEASE-controller -c nbd-csi-controller | grep -q 'registry: node $node registered'"
  done
  echo "every node registered (CSINode and the controller's registry)"
  if kubectl get volumesnapshotclass nbd-csi >/dev/null 2>&1; then echo "VolumeSnapshotClass nbd-csi"; fi
  result "ok ($(kubectl -n "$NS" get pods --no-headers | wc -l) pods Ready)"
}

# ---------------------------------------------------------------------------------------------
# Workload manifests
workload_image=
pullpolicy=IfNotPresent
[ $mode = bundled ] && pullpolicy=Never

pvc() {  # name class size [volumeMode] [dataSource kind/name]
  local name=$1 class=$2 size=$3 vmode=${4:-Filesystem} ds=${5:-}
  {
    cat <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $name, namespace: $APPS}
spec:
  storageClassName: $class
  volumeMode: $vmode
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: $size}}
EOF
    case $ds in
      VolumeSnapshot/*) echo "  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: ${ds#*/}}" ;;
      PersistentVolumeClaim/*) echo "  dataSource: {kind: PersistentVolumeClaim, name: ${ds#*/}}" ;;
    esac
  } | kubectl apply -f - >/dev/null
}

pod() {  # name claim fs|block command: the pod is Ready once the command succeeded
  local name=$1 claim=$2 block=$3 cmd
  # JSON is YAML: the command goes in quoted whatever characters it holds.
  cmd=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1] + " && touch /tmp/ready && exec sleep 100000"))' "$4")
  local vol="volumeMounts: [{name: data, mountPath: /data}]"
  [ "$block" = block ] && vol="volumeDevices: [{name: data, devicePath: /dev/xvda}]"
  kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: $APPS}
spec:
  terminationGracePeriodSeconds: 5
  containers:
    - name: app
      image: $(get workload_image)
      imagePullPolicy: $pullpolicy
      command: [sh, -c, $cmd]
      readinessProbe:
        exec: {command: [test, -f, /tmp/ready]}
        periodSeconds: 1
      $vol
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: $claim}
EOF
}

ready() {  # pod [seconds]
  kubectl -n "$APPS" wait --for=condition=Ready "pod/$1" --timeout="${2:-180}s" >/dev/null 2>&1 ||
    fail "pod $1 not Ready: $(kubectl -n "$APPS" get pod "$1" -o jsonpath='{.status.phase} {.status.containerStatuses[0].state}'; kubectl -n "$APPS" get events --field-selector involvedObject.name="$1" -o jsonpath='{range .items[-3:]}{.reason}: {.message}{"\n"}{end}' 2>/dev/null | tail -3)"
}
x() { kubectl -n "$APPS" exec "$1" -- sh -c "$2"; }  # run in a workload pod

# Pool name of a claim's volume: the CSI volume id is v1:<node>:<pool name>.
pool_volume() {
  local pv
  pv=$(kubectl -n "$APPS" get pvc "$1" -o jsonpath='{.spec.volumeName}')
  [ -n "$pv" ] || fail "claim $1 is not bound"
  kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}' | awk -F: '{print $NF}'
}
component_pod() {  # component (datapath, node) node
  kubectl -n "$NS" get pods -l "app.kubernetes.io/component=$1" --field-selector "spec.nodeName=$2" -o jsonpath='{.items[0].metadata.name}'
}
nbdctl() {  # node args...: nbdctl in that node's datapath pod
  local node=$1; shift
  kubectl -n "$NS" exec "$(component_pod datapath "$node")" -c nbd-datapathd -- nbdctl -o json "$@"
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# ---------------------------------------------------------------------------------------------
# The walk
walk_qos_write() {
  pvc data nbd-csi-qos 1Gi
  # WaitForFirstConsumer: nothing is provisioned before a pod needs the claim.
  sleep 2
  [ "$(kubectl -n "$APPS" get pvc data -o jsonpath='{.status.phase}')" = Pending ] ||
    fail "claim data was bound before any pod used it (WaitForFirstConsumer)"
  pod writer data fs 'dd if=/dev/urandom of=/data/blob bs=1M count=32 2>/dev/null && sha256sum /data/blob > /data/blob.sha256 && sync'
  ready writer
  local node vol sum
  node=$(kubectl -n "$APPS" get pod writer -o jsonpath='{.spec.nodeName}')
  vol=$(pool_volume data)
  sum=$(x writer 'cut -d" " -f1 /data/blob.sha256')
  put node "$node"; put data_vol "$vol"; put sum1 "$sum"
  echo "claim data: volume $vol on node $node; 32 MiB written, sha256 ${sum:0:16}..."
  x writer 'df -h /data | tail -1'
  result "ok (sha256 ${sum:0:12})"
}

# How the node attached the volume, and whether that agrees with what the datapath's init
# container found: kernel NBD (/dev/nbdN) where nbd.ko loaded, the nbdfuse fallback otherwise.
walk_attach_path() {
  local node vol how init
  node=$(get node); vol=$(get data_vol)
  how=$(nbdctl "$node" attachments | json "' '.join(str(a.get(k, '')) for a in d['attachments'] if a['volume'] == '$vol' for k in ('mode', 'device'))")
  [ -n "$how" ] || fail "no attachment of volume $vol on $node (nbdctl attachments)"
  init=$(kubectl -n "$NS" logs "$(component_pod datapath "$node")" -c load-nbd 2>&1 | tail -2)
  echo "volume $vol: attached as ${how#* } (${how%% *}); the datapath's init container said:"
  echo "$init" | sed 's/^/  /'
  put attach_mode "${how%% *}"
  case $init in
    *"nbd is loaded"*|*"loaded nbd.ko"*) [ "${how%% *}" = kernel ] || fail "nbd.ko is loaded but the volume took the ${how%% *} path" ;;
    *"cannot load nbd.ko"*) [ "${how%% *}" != kernel ] || fail "the init container found no nbd.ko, yet the volume is on kernel NBD" ;;
    *) echo "(no load-nbd init container: datapath.kernelNbd.mode off)" ;;
  esac
  result "ok (${how%% *}: ${how#* })"
}

walk_qos_inspect() {
  local node vol
  node=$(get node); vol=$(get data_vol)
  nbdctl "$node" volume inspect "$vol" >"$state/inspect.json"
  python3 - "$state/inspect.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
q, e = d["qos"], d["effective_qos"]
print(f"nbdctl volume inspect {d['name']}: qos {q}")
print(f"  effective {e}")
# values-walk.yaml, class nbd-csi-qos: maxIops 2000, maxBps 200Mi, iopsPerGiB 50, burstMs 1000;
# maxIops wins over iopsPerGiB.
want = {"max_iops": 2000, "max_bps": 200 * 2**20, "iops_per_gib": 50, "burst_ms": 1000}
bad = {k: (q.get(k), v) for k, v in want.items() if q.get(k) != v}
if e.get("iops") != 2000 or e.get("bps") != 200 * 2**20:
    bad["effective"] = (e, "iops 2000, bps 209715200")
if bad:
    print(f"e2e: QoS of the StorageClass not applied: {bad}")
    sys.exit(1)
PY
  result "ok (2000 IOPS, 200Mi/s, burst 1000 ms)"
}

walk_snapshot() {
  [ -n "$(get snapshots 2>/dev/null)" ] || { result "NOT EXERCISED: no snapshot CRDs"; return 0; }
  kubectl apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap, namespace: $APPS}
spec:
  volumeSnapshotClassName: nbd-csi
  source: {persistentVolumeClaimName: data}
EOF
  poll "VolumeSnapshot snap readyToUse" 120 sh -c \
    "kubectl -n $APPS get volumesnapshot snap -o jsonpath='{.status.readyToUse}' | grep -qx true" ||
    fail "snapshot not ready: $(kubectl -n "$APPS" get volumesnapshot snap -o jsonpath='{.status.error.message}')"
  local content
  content=$(kubectl -n "$APPS" get volumesnapshot snap -o jsonpath='{.status.boundVolumeSnapshotContentName}')
  echo "VolumeSnapshot snap ready: $(kubectl get volumesnapshotcontent "$content" -o jsonpath='{.status.snapshotHandle}')"
  # Now the source changes: the restore must still hold what was there at the snapshot.
  local sum2
  sum2=$(x writer 'dd if=/dev/urandom of=/data/blob bs=1M count=32 conv=notrunc 2>/dev/null && sync && sha256sum /data/blob | cut -d" " -f1')
  [ "$sum2" != "$(get sum1)" ] || fail "overwriting did not change the data"
  put sum2 "$sum2"
  echo "source overwritten: sha256 ${sum2:0:16}..."
  result "ok (ready, source then overwritten)"
}

# A claim of CLASS made from SOURCE (kind/name) and a pod on it; prints the sha256 of its
# /data/blob.
sum_of_copy() {  # claim pod source class
  pvc "$1" "$4" 1Gi Filesystem "$3"
  pod "$2" "$1" fs 'true'
  ready "$2"
  x "$2" 'sha256sum /data/blob | cut -d" " -f1'
}

walk_restore() {
  [ -n "$(get snapshots 2>/dev/null)" ] || { result "NOT EXERCISED: no snapshot CRDs"; return 0; }
  get sum2 >/dev/null
  local sum
  # The chart's restore class binds Immediately: the controller places the volume on the
  # snapshot's node, and the pod follows it (examples/restore-pvc.yaml).
  sum=$(sum_of_copy restored reader VolumeSnapshot/snap nbd-csi-restore)
  echo "restored: sha256 ${sum:0:16}... (at the snapshot: $(get sum1 | cut -c1-16)..., source now: $(get sum2 | cut -c1-16)...)"
  [ "$sum" = "$(get sum1)" ] || fail "the restored volume does not hold the snapshot's data"
  x reader 'sha256sum -c /data/blob.sha256 >/dev/null'
  result "ok (original data)"
}

# A VolumeSnapshot of the backup class: ready once the data is in the bucket, its local snapshot
# gone from the pool; then what another cluster does with its handle (a pre-provisioned
# VolumeSnapshotContent and a claim from it, examples/backup/import-backup.yaml); then the import
# deleted (Retain: the backup stays) and the backup deleted with its VolumeSnapshot.
walk_backup() {
  [ -n "$(get backup 2>/dev/null)" ] || not_applicable "NOT EXERCISED: no S3 server (s3rver, or E2E_S3_ENDPOINT)"
  local sum t0=$SECONDS node
  node=$(get node)
  sum=$(x writer 'sync && sha256sum /data/blob | cut -d" " -f1')
  kubectl apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: backup, namespace: $APPS}
spec:
  volumeSnapshotClassName: nbd-csi-backup
  source: {persistentVolumeClaimName: data}
EOF
  poll "VolumeSnapshot backup readyToUse" 180 sh -c \
    "kubectl -n $APPS get volumesnapshot backup -o jsonpath='{.status.readyToUse}' | grep -qx true" ||
    fail "backup not ready: $(kubectl -n "$APPS" get volumesnapshot backup -o jsonpath='{.status.error.message}')"
  local content handle name
  content=$(kubectl -n "$APPS" get volumesnapshot backup -o jsonpath='{.status.boundVolumeSnapshotContentName}')
  handle=$(kubectl get volumesnapshotcontent "$content" -o jsonpath='{.status.snapshotHandle}')
  name=${handle##*#}
  echo "VolumeSnapshot backup ready in $((SECONDS - t0)) s: $handle"
  # The snapshotter was told "not ready" while the upload ran (8 MiB/s), and asked again.
  local waits
  waits=$(kubectl -n "$NS" logs "$(kubectl -n "$NS" get pods -l app.kubernetes.io/component=controller -o jsonpath='{.items[0].metadata.name}')" \
    -c nbd-csi-controller | grep -c "backup $handle running on node" || true)
  echo "CreateSnapshot answered ready_to_use=false $waits time(s) before ready"
  [ "$waits" -ge 1 ] || fail "the backup was never reported not ready: was it throttled (backup.bandwidth)?"
  case $handle in "b1:$s3_target#"*) ;; *) fail "handle $handle is not a backup in $s3_target" ;; esac
  if [ -n "$s3_dir" ]; then
    [ -e "$s3_dir/manifests/$name.json._S3rver_object" ] || fail "no manifest $name on the server"
    echo "on the server: manifest $name, $(find "$s3_dir/chunks" -name '*._S3rver_object' | wc -l) chunks"
  fi
  if nbdctl "$node" snapshot list | json '"\n".join(s["name"] for s in d["snapshots"])' | grep -qx "$name"; then
    fail "the local snapshot $name stayed in the pool"
  fi
  # Another cluster would start here: the handle alone, the same classes and Secret.
  kubectl apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata: {name: e2e-imported-backup}
spec:
  deletionPolicy: Retain
  driver: $DRIVER
  volumeSnapshotClassName: nbd-csi-backup
  source: {snapshotHandle: "$handle"}
  volumeSnapshotRef: {name: imported, namespace: $APPS}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: imported, namespace: $APPS}
spec:
  volumeSnapshotClassName: nbd-csi-backup
  source: {volumeSnapshotContentName: e2e-imported-backup}
EOF
  poll "imported VolumeSnapshot readyToUse" 120 sh -c \
    "kubectl -n $APPS get volumesnapshot imported -o jsonpath='{.status.readyToUse}' | grep -qx true" ||
    fail "imported snapshot not ready: $(kubectl -n "$APPS" get volumesnapshot imported -o jsonpath='{.status.error.message}')"
  local got
  got=$(sum_of_copy frombackup backupreader VolumeSnapshot/imported nbd-csi-backup-restore)
  echo "restored from the bucket: sha256 ${got:0:16}... (at the backup: ${sum:0:16}...), $((SECONDS - t0)) s in all"
  [ "$got" = "$sum" ] || fail "the volume restored from the backup does not hold the backed-up data"
  # Retain: the import goes, the backup stays; then the backup's own VolumeSnapshot (Delete).
  kubectl -n "$APPS" delete volumesnapshot imported --wait=true --timeout=60s >/dev/null
  kubectl delete volumesnapshotcontent e2e-imported-backup --wait=true --timeout=60s >/dev/null
  [ -z "$s3_dir" ] || [ -e "$s3_dir/manifests/$name.json._S3rver_object" ] ||
    fail "deleting a Retain import deleted the backup"
  kubectl -n "$APPS" delete volumesnapshot backup --wait=true --timeout=120s >/dev/null
  poll "VolumeSnapshotContent $content deleted" 120 sh -c "! kubectl get volumesnapshotcontent $content >/dev/null 2>&1" ||
    fail "the backup's VolumeSnapshotContent stayed"
  if [ -n "$s3_dir" ]; then
    [ ! -e "$s3_dir/manifests/$name.json._S3rver_object" ] || fail "the backup's manifest stayed after its delete"
  fi
  # A class whose bucket does not exist: the VolumeSnapshot's status carries the cause.
  kubectl apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: e2e-backup-nobucket}
driver: $DRIVER
deletionPolicy: Delete
parameters:
  backupTarget: s3://no-such-bucket/x
  csi.storage.k8s.io/snapshotter-secret-name: nbd-csi-backup
  csi.storage.k8s.io/snapshotter-secret-namespace: $NS
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: nobucket, namespace: $APPS}
spec:
  volumeSnapshotClassName: e2e-backup-nobucket
  source: {persistentVolumeClaimName: data}
EOF
  poll "VolumeSnapshot nobucket shows the error" 90 sh -c \
    "kubectl -n $APPS get volumesnapshot nobucket -o jsonpath='{.status.error.message}' | grep -q 'does not exist'" ||
    fail "no error on VolumeSnapshot nobucket: $(kubectl -n "$APPS" get volumesnapshot nobucket -o jsonpath='{.status}')"
  echo "a missing bucket: VolumeSnapshot error \"$(kubectl -n "$APPS" get volumesnapshot nobucket -o jsonpath='{.status.error.message}' | cut -c1-160)\""
  [ "$(kubectl -n "$APPS" get volumesnapshot nobucket -o jsonpath='{.status.readyToUse}')" != true ] ||
    fail "a backup to a missing bucket is ready"
  kubectl -n "$APPS" delete volumesnapshot nobucket --wait=true --timeout=60s >/dev/null
  kubectl delete volumesnapshotclass e2e-backup-nobucket >/dev/null
  result "ok (in the bucket after $waits not-ready answer(s), imported by handle and restored bit-exact, deleted; a missing bucket in the snapshot's status)"
}

# Schedules from a StorageClass reach the node's datapath (which runs them: their firing is
# tested with an injected clock in schedule_runner_test, not by waiting here); a bad cron
# expression is refused at provisioning, naming the key.
walk_schedule() {
  local target=${s3_target:-s3://e2e/backups}
  kubectl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: e2e-scheduled}
provisioner: $DRIVER
volumeBindingMode: Immediate
parameters:
  snapshotSchedule: "0 3 * * *"
  snapshotRetain: "4"
  backupSchedule: "30 3 * * 0"
  backupRetain: "2"
  backupTarget: "$target"
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: e2e-badschedule}
provisioner: $DRIVER
volumeBindingMode: Immediate
parameters:
  snapshotSchedule: "0 25 * * *"
EOF
  pvc scheduled e2e-scheduled 64Mi
  pvc badschedule e2e-badschedule 64Mi
  poll "claim scheduled bound" 60 sh -c "[ \"\$(kubectl -n $APPS get pvc scheduled -o jsonpath='{.status.phase}')\" = Bound ]" ||
    fail "claim scheduled not bound"
  local node vol sched
  node=$(get node)
  vol=$(pool_volume scheduled)
  sched=$(nbdctl "$node" volume schedule "$vol")
  echo "$vol on $node: $(json '"snapshots %s keep %s, backups %s keep %s to %s" % (d["schedule"]["snapshot_cron"], d["schedule"]["snapshot_retain"], d["schedule"]["backup_cron"], d["schedule"]["backup_retain"], d["schedule"]["backup_target"])' <<<"$sched")"
  json 'd["schedule"]["snapshot_cron"] == "0 3 * * *" and d["schedule"]["snapshot_retain"] == 4 and d["schedule"]["backup_cron"] == "30 3 * * 0" and d["schedule"]["backup_retain"] == 2 and len(d["schedule"]["runs"]) == 2 and all(r["next_fire"] for r in d["schedule"]["runs"])' <<<"$sched" |
    grep -qx True || fail "the schedule on the node differs from the StorageClass: $sched"
  poll "claim badschedule refused with the cause" 60 sh -c \
    "kubectl -n $APPS get events --field-selector involvedObject.name=badschedule -o jsonpath='{.items[*].message}' | grep -q snapshotSchedule" ||
    fail "no ProvisioningFailed naming snapshotSchedule for claim badschedule"
  echo "claim badschedule: $(kubectl -n "$APPS" get events --field-selector involvedObject.name=badschedule -o jsonpath='{.items[-1:].message}' | grep -o 'snapshotSchedule.*' | head -1 | cut -c1-140)"
  [ "$(kubectl -n "$APPS" get pvc badschedule -o jsonpath='{.status.phase}')" = Pending ] || fail "claim badschedule is not Pending"
  kubectl -n "$APPS" delete pvc scheduled badschedule --wait=true --timeout=60s >/dev/null
  kubectl delete storageclass e2e-scheduled e2e-badschedule >/dev/null
  result "ok (StorageClass schedule on the node's volume; a bad cron refused naming the key)"
}

walk_clone() {
  local sum_src
  sum_src=$(x writer 'sync && sha256sum /data/blob | cut -d" " -f1')
  local sum
  sum=$(sum_of_copy cloned cloner PersistentVolumeClaim/data nbd-csi-qos)
  echo "clone of data: sha256 ${sum:0:16}... (source ${sum_src:0:16}...)"
  [ "$sum" = "$sum_src" ] || fail "the clone does not hold the source's data"
  result "ok (same data as the source)"
}

# Expansion is asked for early and checked later: the kubelet notices a grown claim of a
# running pod on its own schedule (up to a minute or two on 1.20), and other steps run meanwhile.
walk_expand_request() {
  pvc grow nbd-csi-xfs 1Gi
  pod grower grow fs 'true'
  ready grower
  local before
  before=$(x grower 'df -k /data | tail -1' | awk '{print $2}')
  put grow_before "$before"
  kubectl -n "$APPS" patch pvc grow -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null
  put grow_asked "$SECONDS"
  echo "xfs claim grow mounted in pod grower: df $((before / 1024)) MiB; asked for 2Gi"
  result "ok (1Gi -> 2Gi asked)"
}

walk_expand_check() {
  local before after
  before=$(get grow_before)
  poll "df in the running pod shows the file system grown" 180 sh -c \
    "[ \$(kubectl -n $APPS exec grower -- df -k /data | tail -1 | awk '{print \$2}') -gt $((before * 18 / 10)) ]" ||
    fail "not grown online: $(kubectl -n "$APPS" get pvc grow -o jsonpath='{.status.conditions}') $(kubectl -n "$APPS" get events --field-selector involvedObject.name=grow -o jsonpath='{range .items[-2:]}{.message}{"\n"}{end}')"
  after=$(x grower 'df -k /data | tail -1' | awk '{print $2}')
  poll "claim grow reports 2Gi" 60 sh -c "kubectl -n $APPS get pvc grow -o jsonpath='{.status.capacity.storage}' | grep -qx 2Gi"
  x grower 'touch /data/after-grow && sync'
  echo "xfs in pod grower: df $((before / 1024)) MiB -> $((after / 1024)) MiB while mounted, $((SECONDS - $(get grow_asked))) s after the request; claim capacity 2Gi"
  result "ok ($((before / 1024)) -> $((after / 1024)) MiB, xfs)"
}

walk_block() {
  pvc blk nbd-csi 1Gi Block
  pod blocker blk block 'true'
  ready blocker
  local size
  size=$(x blocker 'blockdev --getsize64 /dev/xvda')
  [ "$size" = $((1 << 30)) ] || fail "/dev/xvda is $size bytes, want 1073741824"
  x blocker 'dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null && dd if=/tmp/p of=/dev/xvda bs=1M seek=100 conv=fsync 2>/dev/null &&
    a=$(sha256sum < /tmp/p) && b=$(dd if=/dev/xvda bs=1M skip=100 count=8 iflag=direct 2>/dev/null | sha256sum) && [ "$a" = "$b" ]' ||
    fail "data written to the raw device did not read back"
  echo "raw block /dev/xvda: $size bytes; 8 MiB written at 100 MiB with O_DIRECT read back identical"
  result "ok (1 GiB device, data read back)"
}

# fio writes and verifies (crc32c, O_DIRECT) in a loop, in the background of the pod's own
# command, until /data/fio.stop appears (at most SECONDS); each run leaves its JSON report and
# its start and end time.
start_fio() {  # pod claim max-seconds
  local fio="fio --name=v --filename=/data/fio.file --size=32M --rw=randwrite --bs=4k"
  fio+=" --ioengine=psync --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1"
  fio+=" --output-format=json --output=/data/fio.\$n.json"
  pvc "$2" nbd-csi 1Gi
  pod "$1" "$2" fs "rm -f /data/fio.* && { end=\$((\$(date +%s) + $3)); n=0; rc=0;
    while [ \$(date +%s) -lt \$end ] && [ \$rc -eq 0 ] && [ ! -e /data/fio.stop ]; do n=\$((n + 1)); s=\$(date +%s);
      $fio; rc=\$?; echo \$s \$(date +%s) \$rc >> /data/fio.runs; done;
    echo runs=\$n rc=\$rc > /data/fio.done; } >/dev/null 2>&1 & true"
  ready "$1"
}
finish_fio() {  # pod from to: waits for the loop; fails on any fio error, or when fio was not
  # running without a gap from time FROM to time TO (epoch seconds)
  sleep 2
  x "$1" 'touch /data/fio.stop'
  poll "fio in $1 finished" 240 kubectl -n "$APPS" exec "$1" -- test -f /data/fio.done || fail "fio did not finish"
  local done errs
  done=$(x "$1" 'cat /data/fio.done')
  errs=$(x "$1" 'cat /data/fio.*.json' | python3 -c '
import json, sys
text = sys.stdin.read()
dec, i, errs, n, w = json.JSONDecoder(), 0, 0, 0, 0
while True:
    while i < len(text) and text[i].isspace(): i += 1
    if i >= len(text): break
    d, i = dec.raw_decode(text, i)
    for j in d["jobs"]:
        n += 1; errs += j["error"]; w += j["write"]["io_bytes"]
print(f"{n} fio runs, {w >> 20} MiB written and verified, errors {errs}")')
  echo "fio: $done; $errs"
  [[ $done == *"rc=0" ]] && [[ $errs == *"errors 0" ]] || fail "fio reported errors: $done; $errs"
  x "$1" 'cat /data/fio.runs' | python3 -c '
import sys
runs = [tuple(map(int, l.split())) for l in sys.stdin if l.strip()]
lo, hi = int(sys.argv[1]), int(sys.argv[2])
# Back to back (a run starts the second the previous ended, or the same second) from before
# FROM to after TO: I/O with verification ran through the whole window.
gaps = [(a[1], b[0]) for a, b in zip(runs, runs[1:]) if b[0] - a[1] > 1]
ok = runs and runs[0][0] <= lo and runs[-1][1] >= hi and not gaps
print(f"fio ran from {runs[0][0] - lo:+d} s to {runs[-1][1] - lo:+d} s around the restart (which took {hi - lo} s), {len(runs)} runs, gaps {gaps}")
sys.exit(0 if ok else 1)' "$2" "$3" || fail "fio did not run throughout the restart"
}

# Deletes the COMPONENT (node or datapath) pod of the node while a pod writes with fio verify;
# the DaemonSet's new pod must be Ready and fio must have run throughout with zero errors.
restart_under_fio() {  # component fio-pod claim
  local node old new t_del t_ready
  node=$(get node)
  start_fio "$2" "$3" 300
  sleep 5
  old=$(component_pod "$1" "$node")
  t_del=$(date +%s)
  kubectl -n "$NS" delete pod "$old" --wait=true >/dev/null
  poll "a new $1 pod on $node" 90 sh -c "p=\$(kubectl -n $NS get pods -l app.kubernetes.io/component=$1 --field-selector spec.nodeName=$node -o jsonpath='{.items[0].metadata.name}'); [ -n \"\$p\" ] && [ \"\$p\" != $old ]"
  new=$(component_pod "$1" "$node")
  kubectl -n "$NS" wait --for=condition=Ready "pod/$new" --timeout=120s >/dev/null || fail "$1 pod $new not Ready"
  t_ready=$(date +%s)
  echo "$1 pod $old deleted while fio ran; $new Ready $((t_ready - t_del)) s later"
  finish_fio "$2" "$t_del" "$t_ready"
  # The volume is still mounted and usable (the node plugin rebuilds its view from the mount
  # table; the datapath reconnects the kernel device).
  x "$2" 'df /data >/dev/null && ls /data >/dev/null'
}

walk_node_restart() {
  restart_under_fio node fiopod fio
  result "ok (fio verify: zero errors across the restart)"
}

walk_datapath_restart() {
  local node vol mode
  node=$(get node); vol=$(pool_volume fio)
  mode=$(nbdctl "$node" attachments | json "next(a['mode'] for a in d['attachments'] if a['volume'] == '$vol')")
  if [ "$mode" != kernel ]; then
    not_applicable "volumes attach through the nbdfuse fallback here (no nbd.ko), which cannot reconnect after a datapath restart; runs where the kernel has nbd.ko"
  fi
  restart_under_fio datapath fiopod2 fio2
  result "ok (fio verify: zero errors across the datapath restart)"
}

walk_vac() {
  [ -n "$has_vac" ] || { result "NOT EXERCISED: $server_version does not serve VolumeAttributesClass"; return 0; }
  local node vol
  node=$(get node); vol=$(get data_vol)
  kubectl -n "$APPS" patch pvc data -p '{"spec":{"volumeAttributesClassName":"nbd-csi-gold"}}' >/dev/null
  poll "volume $vol takes nbd-csi-gold's QoS" 120 sh -c "kubectl -n $NS exec \$(kubectl -n $NS get pods -l app.kubernetes.io/component=datapath --field-selector spec.nodeName=$node -o jsonpath='{.items[0].metadata.name}') -c nbd-datapathd -- nbdctl -o json volume inspect $vol | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)[\"qos\"][\"max_iops\"] == 10000 else 1)'"
  result "ok (live change to 10000 IOPS)"
}

walk_capacity() {
  [ -n "$has_capacity" ] || { result "NOT EXERCISED: $server_version has no CSIStorageCapacity v1"; return 0; }
  poll "a CSIStorageCapacity for nbd-csi" 120 sh -c "kubectl -n $NS get csistoragecapacities -o jsonpath='{.items[*].storageClassName}' | grep -qw nbd-csi"
  kubectl -n "$NS" get csistoragecapacities -o custom-columns=CLASS:.storageClassName,CAPACITY:.capacity,TOPOLOGY:.nodeTopology.matchLabels --no-headers | head -5
  result "ok (capacity published per node)"
}

# What the external-health-monitor-controller sidecar reads: ListVolumes and ControllerGetVolume on
# the controller's CSI socket, asked the same way from inside the controller's container.
controller_csi() {  # nbdctl csi args...
  kubectl -n "$NS" exec "$(kubectl -n "$NS" get pods -l app.kubernetes.io/component=controller -o jsonpath='{.items[0].metadata.name}')" \
    -c nbd-csi-controller -- nbdctl -o json csi --endpoint unix:///csi/csi.sock --timeout 5 "$@"
}
# "abnormal<TAB>message" of the volume in ListVolumes (all pages), or "missing".
listed_condition() {  # volume-id
  controller_csi controller list-volumes | python3 -c '
import json, sys
d = json.load(sys.stdin)
c = next((v["volume_condition"] for v in d["volumes"] if v["volume_id"] == sys.argv[1]), None)
print("missing" if c is None else str(c["abnormal"]).lower() + "\t" + c["message"])' "$1"
}
listed_is() {  # volume-id true|false
  local c
  c=$(listed_condition "$1")
  echo "$c"
  [ "${c%%	*}" = "$2" ]
}

# A staged volume's node datapath stops answering (its container frozen, as a hung process or a
# stalled node would be): ListVolumes and ControllerGetVolume, what the health monitor sidecar
# turns into a VolumeConditionAbnormal event on the PVC, report the volume abnormal with the
# cause; then healthy again once the datapath answers.
walk_health() {
  [ $mode = bundled ] || not_applicable "freezes the datapath container through this host's containerd (bundled cluster only)"
  local node pv id vol pod cid t0 t_ab t_res t_ok msg
  node=$(get node)
  pv=$(kubectl -n "$APPS" get pvc data -o jsonpath='{.spec.volumeName}')
  id=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
  vol=${id##*:}
  nbdctl "$node" attachments | json "any(a['volume'] == '$vol' for a in d['attachments'])" | grep -qx True ||
    fail "volume $vol of claim data is not attached (staged) on $node"
  listed_is "$id" false >/dev/null || fail "volume $id is not listed healthy before: $(listed_condition "$id")"
  pod=$(component_pod datapath "$node")
  cid=$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.status.containerStatuses[?(@.name=="nbd-datapathd")].containerID}')
  cid=${cid#containerd://}
  [ -n "$cid" ] || fail "no container id for nbd-datapathd in $pod"
  t0=$(date +%s.%N)
  ctr -n k8s.io task pause "$cid" >/dev/null
  # Never leave it frozen (the step runs in a subshell: this trap is the step's own).
  trap "ctr -n k8s.io task resume $cid >/dev/null 2>&1 || true" EXIT
  poll "ListVolumes reports $id abnormal" 60 listed_is "$id" true ||
    fail "volume $id never listed abnormal with its datapath frozen"
  t_ab=$(date +%s.%N)
  msg=$(cut -f2- "$state/.poll")
  echo "datapath container of $node frozen: ListVolumes lists $id abnormal after $(awk "BEGIN{printf \"%.1f\", $t_ab - $t0}") s: \"$msg\""
  [[ $msg == "node $node unreachable: "* ]] || fail "unexpected condition message: $msg"
  controller_csi controller get-volume "$id" >"$state/get.json"
  json '"%s\t%s" % (d["volume_condition"]["abnormal"], d["volume_condition"]["message"])' <"$state/get.json" | tee "$state/get.txt"
  grep -q '^True	node '"$node"' unreachable: ' "$state/get.txt" || fail "ControllerGetVolume does not say abnormal: $(cat "$state/get.txt")"
  t_res=$(date +%s.%N)
  ctr -n k8s.io task resume "$cid" >/dev/null
  trap - EXIT
  poll "ListVolumes reports $id healthy again" 60 listed_is "$id" false ||
    fail "volume $id not healthy again after the datapath resumed"
  t_ok=$(date +%s.%N)
  echo "datapath resumed: $id healthy again after $(awk "BEGIN{printf \"%.1f\", $t_ok - $t_res}") s"
  # The claim's pod still reads its data (the attachment waited for the datapath).
  [ "$(x writer 'sha256sum /data/blob | cut -d" " -f1')" = "$(get sum2)" ] ||
    fail "claim data does not read back its checksum after the datapath resumed"
  result "ok (abnormal in ListVolumes $(awk "BEGIN{printf \"%.1f\", $t_ab - $t0}") s after the freeze, healthy $(awk "BEGIN{printf \"%.1f\", $t_ok - $t_res}") s after; the PVC event itself: NOT EXERCISED, the bundled cluster has no external-health-monitor-controller)"
}

# Prints (and fails on) what is left of CSI volumes under the kubelet's directory, as the node
# plugin sees it: mounts, staging and publish directories, pods' volume directories.
no_leftovers() {  # node kubelet-dir
  local out
  out=$(kubectl -n "$NS" exec "$(component_pod node "$1")" -c nbd-csi-node -- sh -c "
    awk '\$5 ~ \"^$2/\" && \$5 ~ /kubernetes.io[~\\/]csi/ {print \"mount \" \$5}' /proc/self/mountinfo
    find $2/plugins/kubernetes.io/csi $2/pods -name 'pvc-*' 2>/dev/null | sed 's/^/dir /'
    true")
  [ -z "$out" ] || { echo "$out"; return 1; }
}

walk_teardown() {
  local node kdir t0=$SECONDS
  node=$(get node)
  kubectl -n "$APPS" delete pods --all --wait=true --timeout=120s >/dev/null
  echo "pods deleted (volumes unpublished and unstaged) in $((SECONDS - t0)) s"
  kubectl -n "$APPS" delete volumesnapshots --all --wait=true --timeout=120s >/dev/null 2>&1 || true
  kubectl -n "$APPS" delete pvc --all --wait=true --timeout=120s >/dev/null
  poll "every PersistentVolume of $DRIVER deleted" 120 sh -c \
    "! kubectl get pv -o jsonpath='{.items[*].spec.csi.driver}' | grep -qw $DRIVER"
  if kubectl get crd volumesnapshotcontents.snapshot.storage.k8s.io >/dev/null 2>&1; then
    poll "every VolumeSnapshotContent of $DRIVER deleted" 120 sh -c \
      "! kubectl get volumesnapshotcontents -o jsonpath='{.items[*].spec.driver}' | grep -qw $DRIVER"
  fi
  echo "claims, volumes and snapshots deleted at $((SECONDS - t0)) s"
  # Nothing in the pool, nothing attached, nothing mounted or left in the kubelet's directories.
  local n_vol n_snap n_att
  n_vol=$(nbdctl "$node" volume list | json 'len(d["volumes"])')
  n_snap=$(nbdctl "$node" snapshot list | json 'len(d["snapshots"])')
  n_att=$(nbdctl "$node" attachments | json 'len(d["attachments"])')
  echo "pool of $node: $n_vol volumes, $n_snap snapshots, $n_att attachments"
  [ "$n_vol$n_snap$n_att" = 000 ] || fail "left in the pool: $n_vol volumes, $n_snap snapshots, $n_att attachments"
  # The kubelet removes a pod's volume directories asynchronously after the pod is gone.
  kdir=$(kubectl -n "$NS" get pod "$(component_pod node "$node")" -o jsonpath='{.spec.volumes[?(@.name=="kubelet-dir")].hostPath.path}')
  poll "the kubelet's CSI mounts and directories on $node cleaned" 90 no_leftovers "$node" "$kdir" ||
    fail "left in the kubelet's directories on $node: $(no_leftovers "$node" "$kdir" | tr '\n' ' ' | cut -c1-300)"
  echo "no CSI mounts or directories left under $kdir"
  result "ok (pool empty, kubelet directories clean)"
}

walk_uninstall() {
  local pool
  pool=$("$helm" get values "$RELEASE" -n "$NS" -a -o json | json 'd["datapath"]["poolDir"]')
  local t0=$SECONDS
  "$helm" uninstall "$RELEASE" -n "$NS" --wait --timeout 3m >/dev/null
  ! kubectl get csidriver "$DRIVER" >/dev/null 2>&1 || fail "CSIDriver $DRIVER left after uninstall"
  poll "the chart's pods gone" 120 sh -c "[ -z \"\$(kubectl -n $NS get pods -o name)\" ]"
  echo "release uninstalled, its pods gone in $((SECONDS - t0)) s"
  # The namespaces go in the background (the namespace controller takes its time).
  kubectl delete namespace "$APPS" "$NS" --wait=false >/dev/null
  if [ $mode = bundled ]; then
    local files
    files=$(find "$pool" -path "$pool/volumes/*" -o -path "$pool/snapshots/*" 2>/dev/null || true)
    [ -z "$files" ] || fail "files left in the pool $pool: $(echo $files | cut -c1-200)"
    echo "host pool $pool: no volume or snapshot files"
    rm -rf "$pool"
  fi
  result "ok (release, namespaces and CSIDriver gone)"
}

# ---------------------------------------------------------------------------------------------
step "Images: nbd-csi, workload$([ $mode = bundled ] && echo ', sidecars') (load into the cluster)" images
step "Snapshot CRDs" snapshot_support
start_snapshot_controller
start_s3
step "helm install (namespace with the privileged Pod Security label)" install_chart
if [ $failed = 0 ]; then
  step "PVC of nbd-csi-qos (WaitForFirstConsumer), pod writes data + checksum" walk_qos_write
  step "Attach path (kernel NBD or the nbdfuse fallback) as the init container found nbd.ko" walk_attach_path
  step "QoS limits seen with nbdctl volume inspect in the datapath pod" walk_qos_inspect
  step "Online expansion of an xfs PVC in use: asked" walk_expand_request
  step "VolumeSnapshot, then the source overwritten" walk_snapshot
  step "PVC restored from the snapshot (Immediate-binding class) holds the original data" walk_restore
  step "PVC cloned from a PVC" walk_clone
  step "Backup VolumeSnapshot to S3, imported by handle in a pre-provisioned content, restored, deleted" walk_backup
  step "Snapshot and backup schedules from a StorageClass, on the node's volume" walk_schedule
  step "Raw block PVC" walk_block
  step "Online expansion seen by df in the running pod" walk_expand_check
  step "Node plugin pod deleted and recreated under fio verify" walk_node_restart
  step "Datapath pod deleted and recreated under fio verify" walk_datapath_restart
  step "VolumeAttributesClass: live QoS change" walk_vac
  step "CSIStorageCapacity per node" walk_capacity
  step "Volume health: a staged volume's datapath frozen, abnormal in ListVolumes, then healthy" walk_health
  step "Delete everything: nothing left in the pool or the kubelet's directories" walk_teardown
  save_logs
  [ "${E2E_KEEP:-}" = 1 ] || step "helm uninstall" walk_uninstall
fi

echo
echo "Summary (Kubernetes $server_version, $mode cluster, volumes attached through $(case $(get attach_mode 2>/dev/null) in kernel) echo 'kernel NBD';; '') echo '(not reached)';; *) echo "the nbdfuse fallback ($(get attach_mode))";; esac), $((SECONDS - t_start)) s total)"
printf '%s\n' "${results[@]}"
not_here=()
[ -n "$has_vac" ] || not_here+=("VolumeAttributesClass (live QoS change through ControllerModifyVolume): not served")
[ -n "$has_capacity" ] || not_here+=("CSIStorageCapacity v1 (capacity-aware scheduling): not served; the chart leaves the provisioner's capacity mode and the CSIDriver's storageCapacity off")
[ -n "$has_pdb_v1" ] || not_here+=("policy/v1 PodDisruptionBudget: not served; the chart renders policy/v1beta1")
if [ ${#not_here[@]} -gt 0 ]; then
  echo "Not exercised on Kubernetes $server_version:"
  printf '  - %s\n' "${not_here[@]}"
fi
if [ $failed != 0 ]; then
  echo "e2e: FAILED"
  exit 1
fi
echo "e2e: OK"
