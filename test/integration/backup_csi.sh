#!/usr/bin/env bash
# Backup snapshots through the CSI Controller (issue 18: VolumeSnapshotClass backupTarget), end to
# end over real processes: s3rver on the loopback, and two "clusters" that share nothing but the
# bucket: cluster A = nbd-csi-controller A + nbd-datapathd n1 (its own pool), cluster B =
# controller B + nbd-datapathd n2 (another pool). nbdctl csi speaks CSI to each controller, as the
# sidecars do, with the secrets in a file (as the sidecars pass a Secret).
#   - A: a 1 GiB volume with 300 MiB of random data among holes; CreateSnapshot with backupTarget
#     answers ready_to_use=false, then true once backed up (polled like the snapshotter); id
#     b1:...; the local snapshot is gone from n1's pool; the manifest and 75 chunks on the server.
#   - B: ListSnapshots of the b1 id (ready, size); CreateVolume from it is ABORTED while the
#     restore runs, then a volume on n2 whose bytes equal the source's (sha256 over NBD).
#   - A: 10 MiB changed, a second backup snapshot: the server gained the 3 chunks the change
#     touched, about 12 MiB (counted in its data directory); B restores it bit-exact too.
#   - B deletes the first backup snapshot: its manifest goes, the second stays restorable.
#   - kill -9 of n1 while a bandwidth-limited backup runs: no manifest; after the restart the
#     snapshotter's retry backs up again, and the restore is bit-exact.
#   - A VolumeAttributesClass's schedule keys through ControllerModifyVolume land on the volume.
#   - An encrypted target (the key in the secret): manifest not in clear, B restores with the key;
#     without it INVALID_ARGUMENT, with a wrong one PERMISSION_DENIED.
#   - Errors, each a clear CSI code within seconds (a missing bucket once the local snapshot is
#     ready, as its job fails): refused credentials PERMISSION_DENIED (nothing cut), a missing
#     bucket FAILED_PRECONDITION, a dead endpoint UNAVAILABLE, no secret INVALID_ARGUMENT, an
#     unknown backup NOT_FOUND.
# Exits 77 when s3rver (or node) is missing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PY=/usr/bin/python3
S3RVER_BIN=$("$NBDCSI_SRC/scripts/get-s3rver.sh" --check 2>/dev/null) ||
  skip "s3rver is not installed (scripts/deps.sh test installs it)"
[ -x "$NBDCSI_BIN/nbd-csi-controller" ] || skip "needs nbd-csi-controller in $NBDCSI_BIN"
need node jq nbdcopy sha256sum openssl s3cmd
lib_init

MiB=$((1 << 20))
free_port() {
  $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
S3=$(free_port) REGA=$(free_port) REGB=$(free_port) API1=$(free_port) API2=$(free_port)
BUCKET=backups
TARGET=s3://$BUCKET/clusters
mkdir -p "$W/s3"
# s3rver's listing tokens need OpenSSL 3's legacy provider (see backup_s3.sh).
bg env NODE_OPTIONS=--openssl-legacy-provider "$S3RVER_BIN" -d "$W/s3" -a 127.0.0.1 -p "$S3" -s \
  --configure-bucket "$BUCKET"
wait_for 30 $PY -c "import socket; socket.create_connection(('127.0.0.1', $S3), 1)" ||
  die "s3rver did not listen on $S3"
# The Secret the VolumeSnapshotClass and StorageClass name (s3rver's built-in account).
cat >"$W/secret" <<EOF
AWS_ACCESS_KEY_ID=S3RVER
AWS_SECRET_ACCESS_KEY=S3RVER
AWS_ENDPOINT_URL=http://127.0.0.1:$S3
AWS_REGION=us-east-1
EOF
# What the bucket holds, asked from outside with a real S3 client (s3cmd), not through nbd-csi.
s3c() {
  s3cmd --no-ssl --host="127.0.0.1:$S3" --host-bucket= --access_key=S3RVER --secret_key=S3RVER \
    --region=us-east-1 --no-check-md5 "$@"
}
server_chunks() {  # how many chunk objects the server holds
  s3c ls -r "s3://$BUCKET/clusters/chunks/" | grep -c ' s3://' || true
}
server_chunk_bytes() {  # and their bytes
  s3c ls -r "s3://$BUCKET/clusters/chunks/" | awk '/ s3:\/\// { b += $3 } END { print b + 0 }'
}
manifest_exists() { s3c ls "s3://$BUCKET/clusters/manifests/$1.json" | grep -q ' s3://'; }

C=$W/certs
bash "$NBDCSI_SRC/test/tls/make-certs.sh" "$C" n1 n2 >"$W/make-certs.log" 2>&1 ||
  { cat "$W/make-certs.log" >&2; die "make-certs.sh failed"; }
start_controller() {  # start_controller NAME REGISTRY_PORT
  bg "$NBDCSI_BIN/nbd-csi-controller" --csi-endpoint "unix://$W/ctl-$1.sock" \
    --registry-listen "127.0.0.1:$2" --tls-cert "$C/server.crt" --tls-key "$C/server.key" \
    --tls-ca "$C/ca.crt" --heartbeat-interval 300 --heartbeat-ttl 3000 --datapath-timeout 20000 \
    >>"$W/controller-$1.log" 2>&1
  wait_for 15 test -S "$W/ctl-$1.sock" || die "controller $1 did not start: $(cat "$W/controller-$1.log")"
}
declare -A DP_PID
start_dp() {  # start_dp NODE IP API_PORT REGISTRY_PORT
  local n=$1 ip=$2 port=$3 reg=$4
  mkdir -p "$W/pool-$n"
  # A killed daemon leaves its socket behind: waiting for it would pass before the new one listens.
  rm -f "$W/api-$n.sock" "$W/nbd-$n.sock"
  bg "$NBDCSI_BIN/nbd-datapathd" --pool "$W/pool-$n" --capacity 8Gi \
    --api "unix://$W/api-$n.sock" --nbd-listen "unix://$W/nbd-$n.sock" \
    --node-id "$n" --advertise "$ip:$port" --controller "127.0.0.1:$reg" \
    --tls-cert "$C/node-$n.crt" --tls-key "$C/node-$n.key" --tls-ca "$C/ca.crt" \
    --heartbeat-interval 300 >>"$W/datapathd-$n.log" 2>&1
  DP_PID[$n]=$BG_PID
  wait_for 15 test -S "$W/api-$n.sock" || die "datapath $n did not start: $(cat "$W/datapathd-$n.log")"
}
csi() {  # csi CLUSTER ARGS...: nbdctl csi against that cluster's controller
  local c=$1; shift
  "$NBDCSI_BIN/nbdctl" -o json --timeout 30 csi --endpoint "unix://$W/ctl-$c.sock" "$@"
}
dp() { local n=$1; shift; "$NBDCSI_BIN/nbdctl" --api "unix://$W/api-$n.sock" "$@"; }
registered() {  # registered CLUSTER: a volume create would find a node
  csi "$1" controller capacity 2>/dev/null | jq -e '.available_capacity > 0' >/dev/null
}
vol_sha() {  # vol_sha NODE VOLUME: sha256 of its bytes over NBD
  nbdcopy "nbd+unix:///$2?socket=$W/nbd-$1.sock" "$W/read.img" || die "nbdcopy from $2 on $1 failed"
  sha256sum <"$W/read.img" | cut -d' ' -f1
  rm -f "$W/read.img"
}
# snap CLUSTER NAME SOURCE [PARAM...]: CreateSnapshot until ready_to_use, as the snapshotter polls;
# prints the snapshot's JSON; `NOT_READY_SEEN` counts answers with ready_to_use=false.
NOT_READY_SEEN=0
snap_until_ready() {
  local c=$1 name=$2 src=$3; shift 3
  local deadline=$((SECONDS + 90)) out
  while :; do
    out=$(csi "$c" controller snapshot create "$name" --source "$src" \
      --param "backupTarget=$TARGET" --secret-file "$W/secret" "$@") ||
      die "CreateSnapshot $name failed: $out"
    if jq -e '.ready_to_use' >/dev/null <<<"$out"; then echo "$out"; return; fi
    NOT_READY_SEEN=$((NOT_READY_SEEN + 1))
    [ $SECONDS -lt $deadline ] || die "snapshot $name never ready: $out"
    sleep 0.5  # pacing: the snapshotter's retry
  done
}
# restore CLUSTER NAME SNAPSHOT_ID: CreateVolume until it succeeds (ABORTED while the restore
# runs, as the provisioner retries); prints the volume's JSON; ABORTED_SEEN counts the retries.
ABORTED_SEEN=0
restore() {  # restore CLUSTER NAME SNAPSHOT_ID [SECRET_FILE]
  local c=$1 name=$2 id=$3 secret=${4:-$W/secret} deadline=$((SECONDS + 90)) out
  while :; do
    if out=$(csi "$c" controller create-volume "$name" --from-snapshot "$id" \
      --secret-file "$secret" 2>&1); then
      echo "$out"
      return
    fi
    grep -q ABORTED <<<"$out" || die "restore of $id failed: $out"
    ABORTED_SEEN=$((ABORTED_SEEN + 1))
    [ $SECONDS -lt $deadline ] || die "restore of $id never finished: $out"
    sleep 0.5  # pacing: the provisioner's retry
  done
}

# expect_code CODE TEXT CMD...: CMD fails with CODE and TEXT in its message within 20 s, retried
# as the sidecars retry while it answers "not ready yet" (a snapshot whose local copy still runs).
expect_code() {
  local code=$1 text=$2 t0=$SECONDS out; shift 2
  while out=$("$@" 2>&1); do
    jq -e '.ready_to_use == false' >/dev/null <<<"$out" || die "succeeded, expected $code: $*: $out"
    [ $((SECONDS - t0)) -le 20 ] || die "still not failed after 20 s, expected $code: $*"
    sleep 0.5  # pacing: the sidecar's retry
  done
  grep -q "$code" <<<"$out" || die "expected $code, got: $out"
  grep -qi "$text" <<<"$out" || die "expected \"$text\" in: $out"
  [ $((SECONDS - t0)) -le 20 ] || die "took $((SECONDS - t0)) s: $out"
  echo "  $code: $(tail -1 <<<"$out")"
}

step "s3rver, cluster A (controller + n1) and cluster B (controller + n2), nothing shared"
start_controller a "$REGA"
start_controller b "$REGB"
start_dp n1 127.0.0.2 "$API1" "$REGA"
start_dp n2 127.0.0.3 "$API2" "$REGB"
wait_for 15 registered a || die "n1 never registered with controller A"
wait_for 15 registered b || die "n2 never registered with controller B"

step "A: a 1 GiB volume with 300 MiB of random data among holes"
csi a controller create-volume pvc-src --size 1Gi >"$W/src.json" || die "create pvc-src"
SRC=$(jq -r .volume_id <"$W/src.json")
[ "$SRC" = v1:n1:pvc-src ] || die "source id $SRC"
truncate -s 1G "$W/image"
head -c $((300 * MiB)) /dev/urandom | dd of="$W/image" bs=1M seek=100 conv=notrunc status=none
nbdcopy "$W/image" "nbd+unix:///pvc-src?socket=$W/nbd-n1.sock" || die "write pvc-src"
SHA1=$(sha256sum <"$W/image" | cut -d' ' -f1)
[ "$(vol_sha n1 pvc-src)" = "$SHA1" ] || die "pvc-src does not read back what was written"

step "A: CreateSnapshot with backupTarget: not ready while 300 MiB go up, then ready"
NOT_READY_SEEN=0
t0=$SECONDS
snap_until_ready a snap-1 "$SRC" >"$W/snap1.json"
cat "$W/snap1.json"
ID1=$(jq -r .snapshot_id <"$W/snap1.json")
[ "$ID1" = "b1:$TARGET#snap-1" ] || die "snapshot id $ID1"
jqx ".source_volume_id == \"$SRC\" and .size_bytes == $((1024 * MiB))" <"$W/snap1.json"
[ "$NOT_READY_SEEN" -ge 1 ] || die "300 MiB were backed up within the first answer"
manifest_exists snap-1 || die "no manifest of snap-1 on the server"
CHUNKS1=$(server_chunks) BYTES1=$(server_chunk_bytes)
[ "$CHUNKS1" -eq 75 ] || die "expected 75 chunks (300 MiB from 100 MiB on, in 4 MiB chunks), server has $CHUNKS1"
dp n1 -o json snapshot list | jq -e '.snapshots | length == 0' >/dev/null ||
  die "the local snapshot stayed on n1: $(dp n1 snapshot list)"
echo "  not ready $NOT_READY_SEEN time(s), then ready after $((SECONDS - t0)) s; $CHUNKS1 chunks, $((BYTES1 / MiB)) MiB on the server"

step "B (another cluster): ListSnapshots of the b1 id, then CreateVolume from it"
csi b controller snapshot list --id "$ID1" --secret-file "$W/secret" >"$W/list.json" ||
  die "ListSnapshots in B failed"
jqx ".snapshots | length == 1" <"$W/list.json"
jqx ".snapshots[0].ready_to_use and .snapshots[0].size_bytes == $((1024 * MiB))" <"$W/list.json"
ABORTED_SEEN=0
restore b pvc-restored "$ID1" >"$W/r1.json"
jqx '.volume_id == "v1:n2:pvc-restored"' <"$W/r1.json"
[ "$(vol_sha n2 pvc-restored)" = "$SHA1" ] || die "restored volume differs from the source"
echo "  restored bit-exact on n2 (ABORTED $ABORTED_SEEN time(s) first)"

step "A: 10 MiB changed, a second backup snapshot uploads the 3 chunks it touched"
head -c $((10 * MiB)) /dev/urandom | dd of="$W/image" bs=1M seek=200 conv=notrunc status=none
nbdcopy "$W/image" "nbd+unix:///pvc-src?socket=$W/nbd-n1.sock" || die "rewrite pvc-src"
SHA2=$(sha256sum <"$W/image" | cut -d' ' -f1)
snap_until_ready a snap-2 "$SRC" >"$W/snap2.json"
ID2=$(jq -r .snapshot_id <"$W/snap2.json")
CHUNKS2=$(server_chunks) BYTES2=$(server_chunk_bytes)
[ "$CHUNKS2" -eq $((CHUNKS1 + 3)) ] || die "incremental: $CHUNKS1 -> $CHUNKS2 chunks (expected +3)"
up=$((BYTES2 - BYTES1))
[ "$up" -ge $((10 * MiB)) ] && [ "$up" -le $((13 * MiB)) ] ||
  die "incremental: $up bytes uploaded for a 10 MiB change (expected 10-13 MiB: 3 chunks)"
echo "  incremental: +3 chunks, $((up / 1024)) KiB uploaded for the 10 MiB change"
restore b pvc-restored-2 "$ID2" >/dev/null
[ "$(vol_sha n2 pvc-restored-2)" = "$SHA2" ] || die "second restore differs from the source"

step "B deletes the first backup snapshot; the second stays restorable"
csi b controller snapshot delete "$ID1" --secret-file "$W/secret" >/dev/null || die "delete $ID1"
! manifest_exists snap-1 || die "snap-1's manifest survived its delete"
manifest_exists snap-2 || die "snap-2's manifest went with snap-1's delete"
csi b controller snapshot list --id "$ID1" --secret-file "$W/secret" | jq -e '.snapshots | length == 0' \
  >/dev/null || die "a deleted backup is still listed"
restore b pvc-restored-3 "$ID2" >/dev/null
[ "$(vol_sha n2 pvc-restored-3)" = "$SHA2" ] || die "restore after the delete differs"
csi b controller snapshot delete "$ID1" --secret-file "$W/secret" >/dev/null || die "delete is not idempotent"

step "kill -9 of n1 during a backup (2 MiB/s): no manifest; the retry after the restart backs up"
# 12 MiB of new data: what goes up at 2 MiB/s (the rest is already on the server).
head -c $((12 * MiB)) /dev/urandom | dd of="$W/image" bs=1M seek=400 conv=notrunc status=none
nbdcopy "$W/image" "nbd+unix:///pvc-src?socket=$W/nbd-n1.sock" || die "rewrite pvc-src"
SHA3=$(sha256sum <"$W/image" | cut -d' ' -f1)
csi a controller snapshot create snap-k --source "$SRC" --param "backupTarget=$TARGET" \
  --param backupBandwidth=2Mi --secret-file "$W/secret" >"$W/k.json" || die "CreateSnapshot snap-k"
jqx '.ready_to_use == false' <"$W/k.json"
sleep 2  # a window: part of the 12 MiB has gone up at 2 MiB/s
kill -9 "${DP_PID[n1]}"
wait "${DP_PID[n1]}" 2>/dev/null || true
! manifest_exists snap-k || die "a killed backup left a manifest"
start_dp n1 127.0.0.2 "$API1" "$REGA"
wait_for 15 registered a || die "n1 never came back"
snap_until_ready a snap-k "$SRC" >"$W/k2.json"
restore b pvc-restored-k "$(jq -r .snapshot_id <"$W/k2.json")" >/dev/null
[ "$(vol_sha n2 pvc-restored-k)" = "$SHA3" ] || die "the retried backup restores different bytes"

step "an encrypted target: the key in the secret; B restores with it, and refuses without it"
cp "$W/secret" "$W/secret-enc"
echo "NBDCSI_BACKUP_ENCRYPTION_KEY=correct horse battery staple" >>"$W/secret-enc"
ENC=s3://$BUCKET/encrypted
out=""
for _ in $(seq 60); do
  out=$(csi a controller snapshot create snap-enc --source "$SRC" --param "backupTarget=$ENC" \
    --secret-file "$W/secret-enc") || die "encrypted CreateSnapshot failed: $out"
  jq -e '.ready_to_use' >/dev/null <<<"$out" && break
  sleep 0.5  # pacing: the snapshotter's retry
done
jq -e '.ready_to_use' >/dev/null <<<"$out" || die "encrypted backup never ready: $out"
s3c ls "s3://$BUCKET/encrypted/config.json" | grep -q ' s3://' || die "no config.json in the encrypted target"
if grep -rqF "snap-enc" "$W/s3/$BUCKET/encrypted/manifests/"*._S3rver_object; then
  die "the encrypted manifest names its snapshot in clear"
fi
restore b pvc-enc "b1:$ENC#snap-enc" "$W/secret-enc" >/dev/null
[ "$(vol_sha n2 pvc-enc)" = "$SHA3" ] || die "the encrypted backup restores different bytes"
expect_code INVALID_ARGUMENT "encrypt" csi b controller create-volume pvc-enc-nokey \
  --from-snapshot "b1:$ENC#snap-enc" --secret-file "$W/secret"
sed 's/^NBDCSI_BACKUP_ENCRYPTION_KEY=.*/NBDCSI_BACKUP_ENCRYPTION_KEY=wrong/' "$W/secret-enc" >"$W/secret-wrong"
expect_code PERMISSION_DENIED "wrong encryption key" csi b controller create-volume pvc-enc-wrong \
  --from-snapshot "b1:$ENC#snap-enc" --secret-file "$W/secret-wrong"

step "a VolumeAttributesClass's schedule (ControllerModifyVolume) reaches the volume's node"
csi a controller modify "$SRC" --param snapshotSchedule=@daily --param snapshotRetain=3 \
  --param backupSchedule="0 4 * * 0" --param backupTarget="$TARGET" >/dev/null ||
  die "ControllerModifyVolume with a schedule failed"
dp n1 -o json volume schedule pvc-src | jqx ".schedule.snapshot_cron == \"@daily\" and
  .schedule.snapshot_retain == 3 and .schedule.backup_cron == \"0 4 * * 0\" and
  .schedule.backup_target == \"$TARGET\""
expect_code INVALID_ARGUMENT "backupTarget" csi a controller modify "$SRC" --param backupSchedule=@daily

step "errors: each a clear code within seconds"
sed 's/^AWS_SECRET_ACCESS_KEY=.*/AWS_SECRET_ACCESS_KEY=wrong/' "$W/secret" >"$W/bad-secret"
# s3rver checks no signature: a refused key is simulated with an unknown access key id.
sed -i 's/^AWS_ACCESS_KEY_ID=.*/AWS_ACCESS_KEY_ID=NOBODY/' "$W/bad-secret"
expect_code PERMISSION_DENIED "credentials" csi a controller snapshot create snap-bad \
  --source "$SRC" --param "backupTarget=$TARGET" --secret-file "$W/bad-secret"
dp n1 -o json snapshot list | jq -e '.snapshots | map(select(.name == "snap-bad")) | length == 0' >/dev/null ||
  die "refused credentials still cut a local snapshot"
expect_code FAILED_PRECONDITION "does not exist" csi a controller snapshot create snap-nobucket \
  --source "$SRC" --param "backupTarget=s3://no-such-bucket/x" --secret-file "$W/secret"
sed "s|^AWS_ENDPOINT_URL=.*|AWS_ENDPOINT_URL=http://127.0.0.1:$(free_port)|" "$W/secret" >"$W/dead-secret"
expect_code UNAVAILABLE "" csi a controller snapshot create snap-dead \
  --source "$SRC" --param "backupTarget=$TARGET" --secret-file "$W/dead-secret"
expect_code INVALID_ARGUMENT "AWS_ACCESS_KEY_ID" csi b controller create-volume pvc-nosecret \
  --from-snapshot "$ID2"
expect_code NOT_FOUND "not" csi b controller create-volume pvc-none \
  --from-snapshot "b1:$TARGET#no-such-backup" --secret-file "$W/secret"

step "done"
