#!/usr/bin/env bash
# Runs the three daemons with exactly the arguments manifests/nbd-csi.yaml gives them, outside
# Kubernetes, and drives them the way the sidecars would, to show that the deployment as
# written works: the TLS secrets from manifests/gen-tls-secrets.sh are accepted by both ends,
# the datapath finds the controller by its Service name and registers, the node plugin reaches
# the datapath through the shared socket directory, and a volume with the QoS StorageClass's
# parameters is created with those limits, moved through the chart's VolumeAttributesClasses
# (helm mode) with ControllerModifyVolume, staged and published by the node plugin at the
# kubelet's paths (the datapath attaches it: kernel NBD, or the FUSE fallback), and deleted.
#
# Kubernetes stand-ins: a private network and mount namespace (unshare) whose /etc/hosts maps
# the controller Service name and the datapath certificate's name to 127.0.0.1; HOST_IP (the
# downward API's status.hostIP) is that certificate name, since the controller checks the name
# it dials against the datapath's certificate (see the report on --datapath-server-name).
# Host paths live under a temporary root. Needs root for unshare: skipped (77) otherwise.
#
#   smoke.sh plain   manifests/nbd-csi.yaml with the secrets of manifests/gen-tls-secrets.sh
#   smoke.sh helm    `helm template` with the chart's defaults, its generated secrets included
set -euo pipefail
src=${NBDCSI_SRC:?NBDCSI_SRC is set by CTest}
bin=${NBDCSI_BIN:?NBDCSI_BIN is set by CTest}

skip() { echo "SKIP: $*" >&2; exit 77; }

if [ "${1:-}" != --inside ]; then
  mode=${1:?usage: smoke.sh plain|helm}
  case $mode in plain|helm) ;; *) echo "usage: $0 plain|helm" >&2; exit 2 ;; esac
  [ "$(id -u)" = 0 ] || skip "needs root (unshare of the network and mount namespaces)"
  command -v unshare >/dev/null || skip "unshare (util-linux) is missing"
  python3 -c 'import yaml' 2>/dev/null || {
    [ "${CI:-}" = true ] && { echo "FAIL: python3-yaml is missing" >&2; exit 1; }
    skip "python3 has no yaml module"; }
  for b in nbd-datapathd nbd-csi-controller nbd-csi-node nbdctl; do
    [ -x "$bin/$b" ] || { echo "FAIL: $bin/$b is not built" >&2; exit 1; }
  done
  unshare --net --mount --fork true 2>/dev/null || skip "unshare --net --mount is not permitted here"
  if [ "$mode" = helm ]; then
    helm=$("$src/scripts/get-helm.sh" 2>/dev/null) || {
      [ "${CI:-}" = true ] && { echo "FAIL: no helm" >&2; exit 1; }
      skip "no helm (scripts/get-helm.sh)"; }
    export SMOKE_HELM=$helm
  fi
  exec unshare --net --mount --propagation private --fork "$0" --inside "$mode"
fi
mode=$2

root=$(mktemp -d /tmp/nbdcsi-smoke.XXXXXX)
pids=()
staged=0
cleanup() {
  local rc=$?
  # A failure between stage and unstage: give the devices back before the daemons go.
  if [ "$staged" = 1 ]; then
    "$bin/nbdctl" csi --timeout 10 --endpoint "$node_ep" node unpublish v1:node-1:pvc-deploy-smoke \
      --target-path "$tgt" >/dev/null 2>&1 || true
    "$bin/nbdctl" csi --timeout 10 --endpoint "$node_ep" node unstage v1:node-1:pvc-deploy-smoke \
      --staging-path "$stg" >/dev/null 2>&1 || true
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ $rc -ne 0 ]; then
    for log in "$root"/*.log; do
      [ -f "$log" ] && { echo "---- $(basename "$log") (last 30 lines)"; tail -n 30 "$log"; }
    done
  fi
  rm -rf "$root"
  exit $rc
}
trap cleanup EXIT

ip link set lo up
printf '127.0.0.1 localhost nbd-csi-controller.nbd-csi.svc nbd-datapathd\n' >"$root/hosts"
mount --bind "$root/hosts" /etc/hosts

if [ "$mode" = plain ]; then
  manifest=$src/manifests/nbd-csi.yaml
  "$src/manifests/gen-tls-secrets.sh" >"$root/secrets.yaml"
else
  manifest=$root/helm.yaml
  "$SMOKE_HELM" template nbd-csi "$src/charts/nbd-csi" --namespace nbd-csi \
    --api-versions storage.k8s.io/v1beta1/VolumeAttributesClass \
    --set volumeAttributesClasses.enabled=true >"$manifest"
  cp "$manifest" "$root/secrets.yaml"
fi
margs() { python3 "$src/test/deploy/manifest_args.py" "$manifest" "$1" "$root" \
  KUBE_NODE_NAME=node-1 HOST_IP=nbd-datapathd; }
python3 "$src/test/deploy/manifest_args.py" --secrets "$root/secrets.yaml" "$root"
for role in controller datapath; do
  [ -s "$root/secret/nbd-csi-$role-tls/tls.crt" ] ||
    { echo "FAIL: the $role TLS secret was not written" >&2; exit 1; }
done

mapfile -t dp_args < <(margs nbd-datapathd)
mapfile -t ctl_args < <(margs nbd-csi-controller)
mapfile -t node_args < <(margs nbd-csi-node)
[ ${#dp_args[@]} -gt 0 ] && [ ${#ctl_args[@]} -gt 0 ] && [ ${#node_args[@]} -gt 0 ]

arg() {  # arg FLAG ARGS...: the value of --FLAG=V
  local f=$1; shift
  local a
  for a in "$@"; do [[ $a == "$f="* ]] && { echo "${a#"$f="}"; return; }; done
  return 1
}
ctl_ep=$(arg --csi-endpoint "${ctl_args[@]}")
node_ep=$(arg --csi-endpoint "${node_args[@]}")
dp_api=$(arg --api "${dp_args[@]}")

"$bin/nbd-datapathd" "${dp_args[@]}" >"$root/datapath.log" 2>&1 &
pids+=($!)
"$bin/nbd-csi-controller" "${ctl_args[@]}" >"$root/controller.log" 2>&1 &
pids+=($!)
"$bin/nbd-csi-node" "${node_args[@]}" >"$root/node.log" 2>&1 &
pids+=($!)

# Generous for single calls (a loaded CI machine); short for the polls, which retry anyway.
csi() { "$bin/nbdctl" csi --timeout 20 --endpoint "$@"; }
poll() { "$bin/nbdctl" csi --timeout 3 --endpoint "$@"; }
alive() {
  local p
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "FAIL: a daemon exited (pid $p)" >&2; return 1; }
  done
}
# until SECONDS DESCRIPTION CMD...: retries CMD every 0.2 s while the daemons live.
until_ok() {
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  while ! "$@" >"$root/last.out" 2>&1; do
    alive || return 1
    if [ $SECONDS -ge $end ]; then
      echo "FAIL: $what within ${limit}s; last output:" >&2
      cat "$root/last.out" >&2
      return 1
    fi
    sleep 0.2
  done
}

until_ok 30 "controller Probe" poll "$ctl_ep" identity probe
until_ok 30 "node Probe" poll "$node_ep" identity probe
csi "$ctl_ep" identity info | tee "$root/info.out"
grep -q 'nbd.csi.io' "$root/info.out" || { echo "FAIL: plugin name is not nbd.csi.io" >&2; exit 1; }
csi "$node_ep" node info | tee "$root/node-info.out"
grep -q 'node-1' "$root/node-info.out" || { echo "FAIL: NodeGetInfo does not name node-1" >&2; exit 1; }
grep -q 'topology.nbd.csi.io/node' "$root/node-info.out" ||
  { echo "FAIL: NodeGetInfo has no topology segment" >&2; exit 1; }
echo "ok: both CSI endpoints answer where the sidecars and the kubelet dial"

# The node is known to the controller once its datapath has heartbeated over mutual TLS.
registered() {
  poll "$ctl_ep" -o json controller capacity --topology topology.nbd.csi.io/node=node-1 >"$root/cap.json" &&
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); c=d.get("available_capacity", d.get("availableCapacity", 0)); sys.exit(0 if int(c) > 0 else 1)' "$root/cap.json"
}
until_ok 30 "the datapath registering with the controller (heartbeat over mTLS)" registered
echo "ok: the datapath registered through the Service name with the generated certificates"

params=()
while IFS= read -r kv; do params+=(--param "$kv"); done < <(
  python3 "$src/test/deploy/manifest_args.py" --storageclass nbd-csi-qos "$manifest")
csi "$ctl_ep" controller create-volume pvc-deploy-smoke --size 1Gi \
  --topology topology.nbd.csi.io/node=node-1 "${params[@]}" | tee "$root/create.out"
grep -q 'v1:node-1:pvc-deploy-smoke' "$root/create.out" ||
  { echo "FAIL: CreateVolume did not return v1:node-1:pvc-deploy-smoke" >&2; exit 1; }
"$bin/nbdctl" --api "$dp_api" volume list | tee "$root/list.out"
grep -q 'pvc-deploy-smoke' "$root/list.out" || { echo "FAIL: the volume is not in the pool" >&2; exit 1; }
# qos_is WHAT --param K=V...: the volume's limits in the pool are the given parameters.
qos_is() {
"$bin/nbdctl" --api "$dp_api" -o json volume list >"$root/list.json"
python3 - "$root/list.json" "$@" <<'PY'
import json, re, sys
doc = json.load(open(sys.argv[1]))
vols = doc.get("volumes", doc) if isinstance(doc, dict) else doc
vol = next(v for v in vols if v["name"] == "pvc-deploy-smoke")
def qty(s):
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", s)
    mult = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(m.group(1)) * mult
snake = lambda k: re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k).replace("gi_b", "gib")
args = sys.argv[3:]
checked = 0
for kv in args[1::2]:
    k, v = kv.split("=", 1)
    if k.startswith("csi.storage.k8s.io/"):
        continue
    field = snake(k)
    got = vol["qos"].get(field)
    want = qty(v)
    if got != want:
        sys.exit(f"FAIL: {k}={v}: the volume's qos.{field} is {got}, want {want}")
    checked += 1
assert checked > 0, f"{sys.argv[2]} has no QoS parameters"
print(f"ok: the {checked} QoS parameters of {sys.argv[2]} are the volume's limits")
PY
}
qos_is nbd-csi-qos "${params[@]}"
echo "ok: CreateVolume with the nbd-csi-qos parameters made the volume in node-1's pool"
if [ "$mode" = helm ]; then
  # A PVC moved to another VolumeAttributesClass: the resizer sends its parameters as
  # ControllerModifyVolume's mutable_parameters.
  for vac in nbd-csi-silver nbd-csi-gold; do
    vparams=()
    while IFS= read -r kv; do vparams+=(--param "$kv"); done < <(
      python3 "$src/test/deploy/manifest_args.py" --vac "$vac" "$manifest")
    csi "$ctl_ep" controller modify v1:node-1:pvc-deploy-smoke "${vparams[@]}"
    qos_is "$vac" "${vparams[@]}"
  done
fi
# What the kubelet does next, at the paths it uses under kubeletDir: the node plugin asks the
# datapath (through the shared socket directory) to attach the volume, formats it, mounts it,
# and bind-mounts it for the pod.
kubelet=$root/var/lib/kubelet
stg=$kubelet/plugins/kubernetes.io/csi/nbd.csi.io/0123abcd/globalmount
tgt=$kubelet/pods/0000-1111/volumes/kubernetes.io~csi/pvc-deploy-smoke/mount
mkdir -p "$stg"
if [ -e /dev/nbd0 ] || { [ -c /dev/fuse ] && [ -e /dev/loop-control ] && command -v nbdfuse >/dev/null; }; then
staged=1
csi "$node_ep" node stage v1:node-1:pvc-deploy-smoke --staging-path "$stg" --fs-type ext4
csi "$node_ep" node publish v1:node-1:pvc-deploy-smoke --staging-path "$stg" --target-path "$tgt" \
  --fs-type ext4
findmnt -n -o FSTYPE --target "$tgt" | grep -qx ext4 ||
  { echo "FAIL: no ext4 mounted at the pod's target path" >&2; findmnt -R "$kubelet" >&2; exit 1; }
echo "written by the pod" >"$tgt/data"
sync -f "$tgt/data"
csi "$node_ep" node unpublish v1:node-1:pvc-deploy-smoke --target-path "$tgt"
csi "$node_ep" node unstage v1:node-1:pvc-deploy-smoke --staging-path "$stg"
staged=0
if findmnt -R -n "$kubelet" | grep -q .; then
  echo "FAIL: mounts left under the kubelet directory:" >&2; findmnt -R "$kubelet" >&2; exit 1
fi
echo "ok: NodeStage/NodePublish through the datapath socket, a file written, then torn down"
else
  echo "note: no /dev/nbd0 and no FUSE + loop + nbdfuse here: NodeStage/NodePublish not exercised"
fi

csi "$ctl_ep" controller delete-volume v1:node-1:pvc-deploy-smoke
"$bin/nbdctl" --api "$dp_api" volume list >"$root/list.out"
if grep -q 'pvc-deploy-smoke' "$root/list.out"; then
  echo "FAIL: DeleteVolume left the volume in the pool" >&2; exit 1
fi
echo "ok: DeleteVolume removed it"
alive
echo "smoke ($mode): the manifests' arguments make a working controller, node plugin and datapath"
