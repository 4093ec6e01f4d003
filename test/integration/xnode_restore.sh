#!/usr/bin/env bash
# Restores and clones across nodes (issue 16): a real nbd-csi-controller and two real
# nbd-datapathd (n1 on 127.0.0.2, n2 on 127.0.0.3), heartbeating over mutual TLS with node-bound
# certificates from test/tls/make-certs.sh, each serving NBD over TCP with mutual TLS; nbdctl csi
# drives CreateVolume as the provisioner does (ABORTED while the copy runs, retried):
#   - a 1 GiB snapshot on n1 restored with a topology that allows only n2: the new volume is on
#     n2, byte-identical to the snapshot (not to the source volume, written to after the cut),
#     its content source reported, the temporary clone on n1 and the copy's marker on n2 gone;
#     the copy's throughput is printed (MiB/s);
#   - a clone of a sparse volume of n1 onto n2, larger than its source: identical data, holes
#     stay holes (allocated bytes on n2 about the data, not the size), the tail reads zeroes;
#   - idempotency: the same CreateVolume again answers the same volume and copies nothing;
#   - n2 killed mid-copy (the source held with SIGSTOP): its restart deletes the half-copied
#     volume (the copy's marker), and the provisioner's retry copies again, byte-identical;
#   - n1 killed: a restore from its snapshot onto n2 is UNAVAILABLE and leaves nothing on n2.
. "$(dirname "$0")/lib.sh"
need jq openssl python3 nbdcopy cmp
is_datapathd || skip "cross-node copies are nbd-datapathd's"
[ -x "$NBDCSI_BIN/nbd-csi-controller" ] || skip "needs nbd-csi-controller in $NBDCSI_BIN"
lib_init

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
REG=$(free_port) API1=$(free_port) API2=$(free_port) NBD1=$(free_port) NBD2=$(free_port)
C=$W/certs
bash "$NBDCSI_SRC/test/tls/make-certs.sh" "$C" n1 n2 >"$W/make-certs.log" 2>&1 ||
  { cat "$W/make-certs.log" >&2; die "make-certs.sh failed"; }
MiB=$((1 << 20))

step "controller and two datapaths (NBD over TCP with mutual TLS)"
bg "$NBDCSI_BIN/nbd-csi-controller" --csi-endpoint "unix://$W/ctl.sock" \
  --registry-listen "127.0.0.1:$REG" --tls-cert "$C/server.crt" --tls-key "$C/server.key" \
  --tls-ca "$C/ca.crt" --heartbeat-interval 300 --heartbeat-ttl 2000 --datapath-timeout 5000 \
  >>"$W/controller.log" 2>&1
wait_for 15 test -S "$W/ctl.sock" || die "controller did not start: $(cat "$W/controller.log")"
declare -A DP_PID
start_dp() {  # start_dp NODE IP API_PORT NBD_PORT
  local n=$1 ip=$2 port=$3 nbd=$4
  mkdir -p "$W/pool-$n"
  rm -f "$W/api-$n.sock"  # a killed one's: wait for the new one
  bg "$NBDCSI_BIN/nbd-datapathd" --pool "$W/pool-$n" --capacity 4Gi \
    --api "unix://$W/api-$n.sock" --nbd-listen "unix://$W/nbd-$n.sock" \
    --nbd-listen "tcp://$ip:$nbd" --nbd-tls-cert "$C/node-$n.crt" --nbd-tls-key "$C/node-$n.key" \
    --nbd-tls-ca "$C/ca.crt" \
    --node-id "$n" --advertise "$ip:$port" --controller "127.0.0.1:$REG" \
    --tls-cert "$C/node-$n.crt" --tls-key "$C/node-$n.key" --tls-ca "$C/ca.crt" \
    --heartbeat-interval 300 >>"$W/datapathd-$n.log" 2>&1
  DP_PID[$n]=$BG_PID
  wait_for 15 test -S "$W/api-$n.sock" || die "datapath $n did not start: $(cat "$W/datapathd-$n.log")"
}
start_dp n1 127.0.0.2 "$API1" "$NBD1"
start_dp n2 127.0.0.3 "$API2" "$NBD2"
csi() { "$NBDCSI_BIN/nbdctl" -o json --timeout 30 csi --endpoint "unix://$W/ctl.sock" "$@"; }
dp() { local n=$1; shift; "$NBDCSI_BIN/nbdctl" --api "unix://$W/api-$n.sock" "$@"; }
TOPO=topology.nbd.csi.io/node
# Both registered, each with room for 1 GiB (a volume placed on each says so).
registered() {
  local n out
  for n in n1 n2; do
    out=$(csi controller capacity --topology "$TOPO=$n" 2>/dev/null) || return 1
    jq -e '.available_capacity >= 1073741824' >/dev/null <<<"$out" || return 1
  done
}
wait_for 15 registered || die "nodes never registered: $(tail "$W/controller.log")"

# pwrite NODE VOLUME OFFSET FILE: FILE's bytes at OFFSET over NBD on NODE's socket, flushed.
pwrite() { NBD_SOCK="$W/nbd-$1.sock" nbd_pwrite "$2" "$3" "$4"; }
# same NODE VOLUME FILE: the volume's bytes over NBD are FILE's.
same() {
  rm -f "$W/read.img"
  nbdcopy "nbd+unix:///$2?socket=$W/nbd-$1.sock" "$W/read.img" || die "nbdcopy from $2 on $1 failed"
  cmp "$W/read.img" "$3" || die "$2 on $1 differs from $3"
  rm -f "$W/read.img"
}
# create NAME ARGS...: CreateVolume until it succeeds (ABORTED while the copy runs, as the
# provisioner retries); the volume's JSON in $W/NAME.json; ABORTED_SEEN counts the retries.
ABORTED_SEEN=0
create() {
  local name=$1 deadline=$((SECONDS + 120)) out; shift
  while :; do
    if out=$(csi controller create-volume "$name" "$@" 2>&1); then
      echo "$out" >"$W/$name.json"
      return
    fi
    grep -q ABORTED <<<"$out" || die "CreateVolume $name failed: $out"
    ABORTED_SEEN=$((ABORTED_SEEN + 1))
    [ $SECONDS -lt $deadline ] || die "CreateVolume $name never finished: $out"
    sleep 0.2  # pacing: the provisioner's retry
  done
}
no_leftovers() {  # no_leftovers: no temporary clone on either node, no copy marker
  local n
  for n in n1 n2; do
    dp "$n" -o json volume list | jq -e '[.volumes[]?.name | select(startswith("xfer-"))] | length == 0' \
      >/dev/null || die "a temporary clone stays on $n: $(dp "$n" volume list)"
    [ -z "$(ls -A "$W/pool-$n/backup-restores" 2>/dev/null)" ] ||
      die "a copy marker stays on $n: $(ls "$W/pool-$n/backup-restores")"
  done
}

step "a 1 GiB volume on n1, filled with random data, and a snapshot of it"
csi controller create-volume pvc-src --size 1Gi --topology "$TOPO=n1" >"$W/src.json" ||
  die "create pvc-src"
jqx '.volume_id == "v1:n1:pvc-src"' <"$W/src.json"
random_file "$W/expected.img" $((1024 * MiB))
nbdcopy "$W/expected.img" "nbd+unix:///pvc-src?socket=$W/nbd-n1.sock" || die "nbdcopy into pvc-src"
# Without reflink (ext4 /tmp) the snapshot is a background copy: the snapshotter polls.
snapped() {
  csi controller snapshot create snap-1 --source v1:n1:pvc-src >"$W/snap.json" &&
    jq -e '.ready_to_use' >/dev/null <"$W/snap.json"
}
wait_for 60 snapped || die "snapshot never ready: $(cat "$W/snap.json")"
SNAP=$(jq -r .snapshot_id <"$W/snap.json")
[ "$SNAP" = s1:n1:snap-1 ] || die "snapshot id $SNAP"
# After the cut: the restore must hold the snapshot's bytes, not these.
random_file "$W/later.img" $((4 * MiB))
pwrite n1 pvc-src $((100 * MiB)) "$W/later.img"

step "restore it with a topology that allows only n2: copied across, byte-identical"
t0=$(date +%s.%N)
create pvc-r --from-snapshot "$SNAP" --topology "$TOPO=n2"
secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
cat "$W/pvc-r.json"
jqx '.volume_id == "v1:n2:pvc-r"' <"$W/pvc-r.json"
jqx '.capacity_bytes == 1073741824' <"$W/pvc-r.json"
jqx ".content_source.snapshot_id == \"$SNAP\"" <"$W/pvc-r.json"
jqx ".accessible_topology == [{\"$TOPO\": \"n2\"}]" <"$W/pvc-r.json"
same n2 pvc-r "$W/expected.img"
no_leftovers
grep -E "copy copy-[0-9]+ of \"xfer-pvc-r\".*done" "$W/datapathd-n2.log" >"$W/done.txt" ||
  die "no copy job ended on n2: $(grep -i copy "$W/datapathd-n2.log" | tail)"
rate=$(sed -nE 's/.* at ([0-9.]+) MiB\/s$/\1/p' "$W/done.txt" | tail -1)
echo "  1 GiB restore across nodes: CreateVolume done in $secs s (ABORTED answers: $ABORTED_SEEN); copy job: $rate MiB/s"
echo "  throughput end to end: $(awk -v s="$secs" 'BEGIN { printf "%.0f", 1024 / s }') MiB/s"
# For scale, on this machine now: nbdcopy of the same 1 GiB between the two datapaths' Unix
# sockets (no TLS, one process), flushed. Printed, not checked.
dp n2 volume create ref --size 1Gi >/dev/null || die "create ref on n2"
t0=$(date +%s.%N)
nbdcopy --flush "nbd+unix:///pvc-src?socket=$W/nbd-n1.sock" "nbd+unix:///ref?socket=$W/nbd-n2.sock" ||
  die "reference nbdcopy failed"
echo "  reference: nbdcopy --flush n1 -> n2 over Unix sockets: $(awk -v a="$t0" -v b="$(date +%s.%N)" \
  'BEGIN { printf "%.0f", 1024 / (b - a) }') MiB/s"
dp n2 volume delete ref >/dev/null || die "delete ref"

step "the same CreateVolume again: the same volume, nothing copied"
copies=$(grep -c "copy copy-[0-9]*: .*started" "$W/datapathd-n2.log")
create pvc-r --from-snapshot "$SNAP" --topology "$TOPO=n2"
jqx '.volume_id == "v1:n2:pvc-r"' <"$W/pvc-r.json"
[ "$(grep -c "copy copy-[0-9]*: .*started" "$W/datapathd-n2.log")" = "$copies" ] ||
  die "a retry started another copy"
# An excluded node with a volume of that name is ALREADY_EXISTS, not a second copy.
out=$(csi controller create-volume pvc-r --from-snapshot "$SNAP" --topology "$TOPO=n1" 2>&1) &&
  die "a request that excludes the volume's node succeeded: $out"
grep -q ALREADY_EXISTS <<<"$out" || die "expected ALREADY_EXISTS: $out"

step "a clone of a sparse 64 MiB volume of n1 onto n2, as a 96 MiB volume"
csi controller create-volume pvc-sparse --size 64Mi --topology "$TOPO=n1" >/dev/null ||
  die "create pvc-sparse"
truncate -s $((64 * MiB)) "$W/sparse.img"
random_file "$W/a.img" $((3 * MiB))
random_file "$W/b.img" $((1 * MiB))
pwrite n1 pvc-sparse $((8 * MiB)) "$W/a.img"
pwrite n1 pvc-sparse $((63 * MiB)) "$W/b.img"
dd if="$W/a.img" of="$W/sparse.img" bs=1M seek=8 conv=notrunc status=none
dd if="$W/b.img" of="$W/sparse.img" bs=1M seek=63 conv=notrunc status=none
create pvc-clone --from-volume v1:n1:pvc-sparse --size 96Mi --topology "$TOPO=n2"
jqx '.volume_id == "v1:n2:pvc-clone" and .capacity_bytes == 100663296' <"$W/pvc-clone.json"
jqx '.content_source.volume_id == "v1:n1:pvc-sparse"' <"$W/pvc-clone.json"
truncate -s $((96 * MiB)) "$W/sparse.img"
same n2 pvc-clone "$W/sparse.img"
alloc=$(dp n2 -o json volume inspect pvc-clone | jq .allocated_bytes)
echo "  clone: 96 MiB volume, 4 MiB of data, $((alloc / 1024)) KiB allocated on n2"
[ "$alloc" -le $((12 * MiB)) ] || die "the clone's holes were written: $alloc bytes allocated"
no_leftovers

step "n2 killed mid-copy: its restart deletes the half-copied volume; the retry copies again"
# The source held (SIGSTOP) as soon as n2 logs the copy's start (a 1 GiB copy takes seconds; the
# CreateVolume that starts it waits up to 3 s for it, so it runs in the background), so n2
# certainly dies in it.
(
  deadline=$((SECONDS + 60))
  while ! out=$(csi controller create-volume pvc-r2 --from-snapshot "$SNAP" --topology "$TOPO=n2" 2>&1); do
    grep -q ABORTED <<<"$out" || exit 0  # n2 killed under it: expected
    [ $SECONDS -lt $deadline ] || exit 0
    sleep 0.2
  done
) >/dev/null 2>&1 &
CREATOR=$!
LIB_PIDS+=("$CREATOR")
wait_for 60 grep -q 'copy copy-[0-9]*: "xfer-pvc-r2" .*started' "$W/datapathd-n2.log" ||
  die "the copy into pvc-r2 never started: $(tail -5 "$W/controller.log")"
kill -STOP "${DP_PID[n1]}"
kill -9 "${DP_PID[n2]}"
wait "${DP_PID[n2]}" 2>/dev/null || true
! grep -q 'of "xfer-pvc-r2" .*: done' "$W/datapathd-n2.log" ||
  die "the copy into pvc-r2 ended before n2 was killed"
grep 'copy copy-[0-9]* into "pvc-r2"' "$W/datapathd-n2.log" | tail -1 || true
kill "$CREATOR" 2>/dev/null || true
wait "$CREATOR" 2>/dev/null || true
[ -e "$W/pool-n2/backup-restores/pvc-r2" ] || die "no copy marker for pvc-r2 on n2"
start_dp n2 127.0.0.3 "$API2" "$NBD2"
kill -CONT "${DP_PID[n1]}"
wait_for 15 grep -q 'volume "pvc-r2" was being restored when the daemon stopped; the half-restored volume was deleted' \
  "$W/datapathd-n2.log" || die "n2's restart did not delete the half-copied volume"
dp n2 -o json volume list | jq -e '[.volumes[]?.name] | index("pvc-r2") == null' >/dev/null ||
  die "pvc-r2 survived n2's restart"
[ -z "$(ls -A "$W/pool-n2/backup-restores")" ] || die "the marker stays after the restart"
wait_for 15 registered || die "n2 never registered again"
create pvc-r2 --from-snapshot "$SNAP" --topology "$TOPO=n2"
jqx '.volume_id == "v1:n2:pvc-r2"' <"$W/pvc-r2.json"
same n2 pvc-r2 "$W/expected.img"
no_leftovers

step "n1 killed: a restore of its snapshot onto n2 is UNAVAILABLE and leaves nothing"
kill -9 "${DP_PID[n1]}"
wait "${DP_PID[n1]}" 2>/dev/null || true
for attempt in 1 2; do  # while n1 is still registered (ttl), then once it has expired
  out=$(csi controller create-volume pvc-bad --from-snapshot "$SNAP" --topology "$TOPO=n2" 2>&1) &&
    die "restore from a dead node succeeded: $out"
  grep -q UNAVAILABLE <<<"$out" || die "expected UNAVAILABLE (attempt $attempt): $out"
  echo "  attempt $attempt: $(tail -1 <<<"$out")"
  dp n2 -o json volume list | jq -e '[.volumes[]?.name] | index("pvc-bad") == null' >/dev/null ||
    die "pvc-bad was created on n2"
  [ -z "$(ls -A "$W/pool-n2/backup-restores" 2>/dev/null)" ] || die "a copy marker stays on n2"
  sleep 2.5  # past the heartbeat ttl
done
step "done"
