#!/bin/bash
# nbd-datapathd against the real kernel NBD client. Runs INSIDE the VM (test/vm/nbd-kernel-vm ships
# nbd-datapathd and nbdctl to /opt/bin); the pool is on the guest's /tmp tmpfs, where O_DIRECT is not
# available and the daemon falls back to buffered I/O.
#
# Debian's nbd-client attaches /dev/nbdN to the daemon's unix socket over generic netlink, with a
# 4096-byte block size. Covered, each step timed:
#   - size and logical block size the kernel took from the handshake (/sys/block/nbdN)
#   - ext4 and xfs: mkfs (which TRIMs the whole device), mount, files written and hashed, umount,
#     offline fsck, detach, then reattach on another device (xfs: across a daemon restart, so the
#     data must come back from the pool) and every hash verified
#   - fio randwrite O_DIRECT libaio iodepth=16 with crc32c verify on a raw 64M device
#   - multi-connection attach (-C 4): the daemon sees 4 connections, fio with 4 jobs verifies
#   - blkdiscard of a range: the daemon counts the TRIM, the range reads back as zeros, the data
#     around it is untouched and the volume's allocation shrinks
#   - every detach (nbd-client -d) leaves the volume with 0 open connections
#   - the daemon stops cleanly on SIGTERM (exit 0)
#   - the kernel log has no I/O errors and no NBD protocol complaints
. /opt/lib/nbdcsi-vm.sh

D=/tmp/dp POOL=/tmp/dp/pool API=/tmp/dp/api.sock SOCK=/tmp/dp/nbd.sock LOG=/tmp/dp/datapathd.log
DPID=
fail() {
  echo "FAIL: $*"
  echo "---- datapathd log (last 30 lines) ----"; tail -n 30 "$LOG" 2>/dev/null || true
  echo "---- kernel log, nbd and I/O lines (last 30) ----"
  dmesg | grep -iE 'nbd|I/O error|blk_update|EXT4-fs|XFS' | tail -n 30 || true
  exit 1
}
nbdctl() { command nbdctl --api "unix://$API" --timeout 10 "$@"; }
# jqv VOLUME FILTER: one value from `nbdctl -o json volume inspect`.
jqv() { nbdctl -o json volume inspect "$1" | jq -r "$2"; }

daemon_start() {
  rm -f "$API" "$SOCK"
  nbd-datapathd --pool "$POOL" --api "unix://$API" --nbd-listen "unix://$SOCK" --workers 2 \
    --log-level info >>"$LOG" 2>&1 &
  DPID=$!
  local i
  for i in $(seq 200); do
    [ -S "$API" ] && [ -S "$SOCK" ] && return 0
    kill -0 "$DPID" 2>/dev/null || { wait "$DPID" || true; fail "nbd-datapathd exited during startup"; }
    sleep 0.05
  done
  fail "nbd-datapathd did not create $API and $SOCK within 10 s"
}
daemon_stop() {
  kill -TERM "$DPID"
  local i rc=0
  for i in $(seq 200); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.05; done
  kill -0 "$DPID" 2>/dev/null && fail "nbd-datapathd ignored SIGTERM for 10 s"
  wait "$DPID" || rc=$?
  [ $rc = 0 ] || fail "nbd-datapathd exited $rc on SIGTERM (want 0)"
  DPID=
}

# attach DEV VOLUME BYTES [nbd-client flags...]: attach and check what the kernel made of the handshake.
attach() {
  local dev=$1 vol=$2 bytes=$3 n=${1#/dev/}; shift 3
  nbd-client -unix "$SOCK" "$dev" -N "$vol" -b 4096 "$@" >/tmp/nbd-client.out 2>&1 ||
    { cat /tmp/nbd-client.out; fail "nbd-client -unix $SOCK $dev -N $vol -b 4096 $*"; }
  local size; size=$(cat "/sys/block/$n/size")
  [ "$size" = $((bytes / 512)) ] || fail "/sys/block/$n/size = $size, want $((bytes / 512)) ($vol is $bytes bytes)"
  [ "$(blockdev --getsize64 "$dev")" = "$bytes" ] || fail "blockdev --getsize64 $dev != $bytes"
  local lbs; lbs=$(cat "/sys/block/$n/queue/logical_block_size")
  [ "$lbs" = 4096 ] || fail "$dev logical_block_size = $lbs, want 4096 (nbd-client -b 4096)"
}
# detach DEV VOLUME: nbd-client -d, then the device has no size and the daemon no connection left.
detach() {
  local dev=$1 vol=$2 n=${1#/dev/} i conns=
  nbd-client -d "$dev" >/tmp/nbd-client.out 2>&1 || { cat /tmp/nbd-client.out; fail "nbd-client -d $dev"; }
  for i in $(seq 100); do [ "$(cat "/sys/block/$n/size")" = 0 ] && break; sleep 0.1; done
  [ "$(cat "/sys/block/$n/size")" = 0 ] || fail "$dev still has a size 10 s after nbd-client -d"
  for i in $(seq 100); do
    conns=$(jqv "$vol" .open_connections) || fail "nbdctl volume inspect $vol"
    [ "$conns" = 0 ] && return 0
    sleep 0.1
  done
  fail "$vol still has $conns open connection(s) 10 s after nbd-client -d $dev"
}

# write_tree DIR: a 16 MiB file plus 300 small files of varied sizes, and their hashes in $D/sums.
write_tree() {
  local dir=$1 i
  dd if=/dev/urandom of="$dir/big" bs=1M count=16 status=none
  mkdir -p "$dir/small"
  for i in $(seq 300); do head -c $(( (i * 7919) % 65536 + 1 )) /dev/urandom >"$dir/small/f$i"; done
  (cd "$dir" && find . -type f | sort | xargs sha256sum) >"$D/sums"
}
verify_tree() {
  (cd "$1" && sha256sum -c -s "$D/sums") || fail "$2: file contents differ after remount"
  [ "$(cd "$1" && find . -type f | wc -l)" = "$(wc -l <"$D/sums")" ] || fail "$2: file count differs"
}

# Its own tmpfs, larger than RAM: the pool's capacity check counts provisioned bytes (1.2 GiB here)
# against the file system's size, while the data actually written stays around 300 MiB.
mkdir -p "$POOL" /mnt/t
mount -t tmpfs -o size=2g pool "$POOL"
step "kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB; $(nbd-client -V 2>&1 | head -1)"
{ [ -b /dev/nbd0 ] && [ -b /dev/nbd3 ]; } || fail "no /dev/nbd0../dev/nbd3: nbd.ko not loaded?"
daemon_start
step "nbd-datapathd pid $DPID ready (pool on $(stat -f -c %T "$POOL"))"

MI=$((1024 * 1024))
for v in fs-ext4:512 fs-xfs:512 raw:64 multi:64; do
  nbdctl volume create "${v%%:*}" --size "${v#*:}Mi" >/dev/null || fail "nbdctl volume create ${v%%:*}"
done
step "volumes created: $(nbdctl -o json volume list | jq -r '[.volumes[].name] | join(" ")')"

# ---- file systems --------------------------------------------------------------------------------------
for fs in ext4 xfs; do
  vol=fs-$fs bytes=$((512 * MI))
  attach /dev/nbd0 "$vol" "$bytes"
  [ "$(jqv "$vol" .open_connections)" = 1 ] || fail "$vol: want 1 open connection after attach"
  step "$fs: attached on nbd0, size $(cat /sys/block/nbd0/size) sectors, 1 connection"
  case $fs in
    ext4) mkfs.ext4 -q -F /dev/nbd0 ;;
    xfs) mkfs.xfs -q -f /dev/nbd0 ;;
  esac
  [ "$(blkid -o value -s TYPE /dev/nbd0)" = "$fs" ] || fail "$fs: blkid does not see $fs on nbd0"
  step "$fs: mkfs done ($(nbdctl -o json stats "$vol" | jq -r '.ops.trim.ops') TRIMs so far)"
  mount -t "$fs" /dev/nbd0 /mnt/t
  write_tree /mnt/t
  sync
  step "$fs: mounted, 16 MiB + 300 small files written and synced"
  umount /mnt/t
  case $fs in
    ext4) e2fsck -fn /dev/nbd0 >"$D/fsck.log" 2>&1 || { cat "$D/fsck.log"; fail "e2fsck -fn found problems"; } ;;
    xfs) xfs_repair -n /dev/nbd0 >"$D/fsck.log" 2>&1 || { cat "$D/fsck.log"; fail "xfs_repair -n found problems"; } ;;
  esac
  step "$fs: unmounted, offline check clean"
  detach /dev/nbd0 "$vol"
  step "$fs: detached, 0 connections"
  if [ "$fs" = xfs ]; then
    # The data must now come from the pool's files, not from any state the daemon kept.
    daemon_stop; daemon_start
    step "$fs: nbd-datapathd restarted (clean SIGTERM exit)"
  fi
  # Another device: nothing of nbd0's page cache can answer the reads.
  attach /dev/nbd3 "$vol" "$bytes"
  mount -t "$fs" /dev/nbd3 /mnt/t
  verify_tree /mnt/t "$fs"
  umount /mnt/t
  detach /dev/nbd3 "$vol"
  step "$fs: reattached on nbd3, remounted, every hash verified, detached"
done

# ---- raw device: fio verify, then TRIM -----------------------------------------------------------------
attach /dev/nbd1 raw $((64 * MI))
step "raw: attached on nbd1; fio randwrite 64M bs=4k iodepth=16 O_DIRECT libaio verify=crc32c"
fio --name=verify --filename=/dev/nbd1 --rw=randwrite --bs=4k --size=64M --direct=1 \
  --ioengine=libaio --iodepth=16 --verify=crc32c --verify_fatal=1 --eta=never \
  --output="$D/fio.log" || { cat "$D/fio.log"; fail "fio on nbd1"; }
grep -q 'err= 0' "$D/fio.log" || { cat "$D/fio.log"; fail "fio on nbd1 reported errors"; }
grep -E '^ +(WRITE|READ):' "$D/fio.log" | sed 's/^ */  /'
step "raw: fio verify passed"

# TRIM 8 MiB at 16 MiB. The daemon punches a hole: the range must read as zeros (O_DIRECT, so the
# kernel asks the daemon), and the MiB on each side must be exactly what fio left there (a hole that
# overshoots, or a misaligned one, shows at the edges; reading all 56 MiB costs 30 s under TCG).
rsum() { dd if=/dev/nbd1 bs=1M skip="$1" count="$2" iflag=direct status=none | sha256sum | cut -d' ' -f1; }
before_lo=$(rsum 15 1) before_hi=$(rsum 24 1)
trims0=$(nbdctl -o json stats raw | jq '.ops.trim.ops')
alloc0=$(jqv raw .allocated_bytes)
blkdiscard -o $((16 * MI)) -l $((8 * MI)) /dev/nbd1 || fail "blkdiscard on nbd1"
nbdctl -o json stats raw >"$D/stats.json"
# Only ops and errors: the daemon counts bytes for reads and writes alone, a TRIM's "bytes" stays 0.
trims=$(jq '.ops.trim.ops' "$D/stats.json")
terrs=$(jq '.ops.trim.errors' "$D/stats.json")
[ "$trims" -gt "$trims0" ] || fail "nbdctl stats shows no new TRIM after blkdiscard ($trims0 -> $trims)"
[ "$terrs" = 0 ] || fail "nbdctl stats shows $terrs TRIM errors"
zero=$(head -c $((8 * MI)) /dev/zero | sha256sum | cut -d' ' -f1)
[ "$(rsum 16 8)" = "$zero" ] || fail "the discarded range does not read back as zeros"
{ [ "$(rsum 15 1)" = "$before_lo" ] && [ "$(rsum 24 1)" = "$before_hi" ]; } ||
  fail "blkdiscard of [16M, 24M) changed data outside that range"
alloc1=$(jqv raw .allocated_bytes)
[ $((alloc0 - alloc1)) -ge $((8 * MI)) ] ||
  fail "allocated_bytes went $alloc0 -> $alloc1 after discarding 8 MiB: the hole was not punched"
step "raw: blkdiscard 8M -> $((trims - trims0)) TRIM(s), reads as zeros; neighbours intact; allocation $((alloc0 / MI)) -> $((alloc1 / MI)) MiB"
detach /dev/nbd1 raw
step "raw: detached, 0 connections"

# ---- multi-connection ----------------------------------------------------------------------------------
attach /dev/nbd2 multi $((64 * MI)) -C 4
conns=$(jqv multi .open_connections)
[ "$conns" = 4 ] || fail "multi: nbd-client -C 4 but the daemon sees $conns connection(s)"
# Each job owns a 16M slice, so the kernel spreads requests from 4 submitters over the 4 sockets.
step "multi: attached on nbd2 with 4 connections; fio 4 jobs x 8M randwrite verify"
fio --name=mc --filename=/dev/nbd2 --rw=randwrite --bs=4k --size=8M --offset_increment=16M \
  --numjobs=4 --direct=1 --ioengine=libaio --iodepth=8 --verify=crc32c --verify_fatal=1 \
  --eta=never --group_reporting --output="$D/fio-mc.log" || { cat "$D/fio-mc.log"; fail "fio on nbd2"; }
grep -q 'err= 0' "$D/fio-mc.log" || { cat "$D/fio-mc.log"; fail "fio on nbd2 reported errors"; }
grep -E '^ +(WRITE|READ):' "$D/fio-mc.log" | sed 's/^ */  /'
detach /dev/nbd2 multi
step "multi: fio verify passed, detached, 0 connections"

# ---- shutdown and kernel log ---------------------------------------------------------------------------
daemon_stop
step "nbd-datapathd stopped cleanly"
echo "kernel messages about nbd:"
dmesg | grep -i 'nbd' | sed 's/^/  /' | tail -n 20
# "Receive control failed", "Unexpected reply", "Double reply", "Dead connection": the kernel's own
# words for a server that broke the protocol or dropped a connection while it was in use.
bad=$(dmesg | grep -E 'I/O error|blk_update_request|Buffer I/O error|Receive control failed|Unexpected reply|Double reply|Dead connection|Send control failed|timed out' || true)
[ -z "$bad" ] || { echo "$bad"; fail "the kernel log shows I/O errors or NBD complaints (above)"; }
step "PASS: kernel log has no I/O errors"
