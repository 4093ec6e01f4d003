#!/bin/bash
# Power-cut durability of nbd-datapathd, the xfstests way. Runs INSIDE the VM (test/vm/powercut.cmake
# ships the binaries; the runner loads dm-log-writes and dm-snapshot).
#
# Record: the pool's file system ($POWERCUT_FS: xfs or ext4) is made on a dm-log-writes device over a
# loop device on tmpfs; the log goes to a second loop device. The kernel logs every write only once a
# FLUSH made it durable (FUA ones at once), so replaying the log to entry N gives a disk a power cut
# right after N could have left. While it records:
#   - nbd-datapathd serves the pool; volume "w" is attached through kernel NBD (nbdctl attach) and
#     powercut-writer writes self-describing blocks to /dev/nbdN in rounds (O_DIRECT writes + fsync,
#     i.e. NBD FLUSH; every 5th round one RWF_DSYNC write, i.e. NBD FUA), marking the log "w<round>"
#     after each round is durable;
#   - at the same time other volumes are created, resized, snapshotted and deleted through nbdctl,
#     and "w" itself is snapshotted live; each op is journaled before it is issued and marked
#     "c<op>" in the log after nbdctl acknowledged it.
# Replay (powercut-replay, two workers with an image each): the log is replayed onto a fresh image to
# every FLUSH, FUA and mark after mkfs (consecutive points with no write between them share one image:
# the later, stricter one is checked). At each point, on a throwaway dm-snapshot of the image (so that
# journal recovery and the pool's own recovery write to a scratch device and the replay continues
# from the untouched image): mount (journal recovery); the pool check (powercut/check.h: Pool::Open,
# the daemon's recovery code; every op acknowledged before the point visible, nothing broken or
# abandoned but the one op in flight, every block of "w" and of its snapshots holds the acknowledged
# write or a later one, intact); umount; fsck (xfs_repair -n / e2fsck -fn). Any inconsistency fails
# the test naming the point, the volume or snapshot and the block.
#
# POWERCUT_FAULT=skip-flush|skip-fsync[:N]: self-check. The daemon runs with libpowercut-fault.so
# preloaded: its FLUSH fdatasync (skip-flush), or its libc fsyncs (skip-fsync: metadata), are skipped,
# every one or only the N-th; the test then passes only if some point FAILS, and stops at the first.
# vm.powercut_fault skips the 2nd FLUSH only, during the writer's solo rounds (see below).
# Knobs (bench/powercut_long.sh turns them up): POWERCUT_CYCLES (churn cycles of 4 to 7 ops; 2),
# POWERCUT_ROUNDS (most writer rounds; the writer also stops when the churn is done),
# POWERCUT_PAUSE_MS (between writer rounds), POWERCUT_MAX_POINTS (check only the first N points;
# 0: all), POWERCUT_SEED (the writer's block choice).
. /opt/lib/nbdcsi-vm.sh

FS=${POWERCUT_FS:-xfs} FAULT=${POWERCUT_FAULT:-}
CYCLES=${POWERCUT_CYCLES:-2} PAUSE_MS=${POWERCUT_PAUSE_MS:-1500} ROUNDS=${POWERCUT_ROUNDS:-30}
MAX_POINTS=${POWERCUT_MAX_POINTS:-0}
W=/tmp/pc MNT=/mnt/pool CHK=/mnt/chk
POOL=$MNT/pool API=$W/api.sock SOCK=$W/nbd.sock LOG=$W/datapathd.log OPS=$W/ops JOURNAL=$W/journal
WSTATE=$W/writer.state LOGDM=pc-log
DPID='' WPID=''
case $FS in
  xfs) POOL_MB=320 ;;
  ext4) POOL_MB=256 ;;
  *) echo "FAIL: POWERCUT_FS=$FS (xfs or ext4)"; exit 1 ;;
esac

fail() {
  echo "FAIL: $*"
  echo "---- datapathd log (last 20 lines) ----"; tail -n 20 "$LOG" 2>/dev/null || true
  echo "---- kernel log (last 15 lines) ----"; dmesg | tail -n 15
  exit 1
}
nbdctl() { command nbdctl --api "unix://$API" --timeout 60 "$@"; }

mkdir -p "$W" "$MNT"
# Own tmpfs: the images are sparse, but the log holds every byte written.
mount -t tmpfs -o size=1400m pc "$W"
step "kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB; $FS pool of $POOL_MB MiB${FAULT:+; FAULT INJECTED: $FAULT}"

# ---- record ------------------------------------------------------------------------------------------
truncate -s "${POOL_MB}M" "$W/data.img"
truncate -s 900M "$W/log.img"
DATA=$(losetup -f --show "$W/data.img") LOGDEV=$(losetup -f --show "$W/log.img")
SECTORS=$(blockdev --getsz "$DATA")
dmsetup create "$LOGDM" --table "0 $SECTORS log-writes $DATA $LOGDEV" || fail "dmsetup create log-writes"
DEV=/dev/mapper/$LOGDM
case $FS in
  xfs) mkfs.xfs -q -f "$DEV" ;;
  # Inode tables and journal zeroed now, not by ext4lazyinit in the middle of the workload.
  ext4) mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$DEV" ;;
esac
dmsetup message "$LOGDM" 0 mark mkfs
mount -t "$FS" "$DEV" "$MNT"
step "$FS made on dm-log-writes ($DATA, log on $LOGDEV) and mounted"

NEXT_OP=0
# op KIND ARGS...: journal the op, run it, journal the ack and mark the log "c<N>". snap ops record
# the writer's completed sequence before and its issued sequence after (bounds for the content).
wstate() { od -A n -t u8 -j "$1" -N 8 "$WSTATE" 2>/dev/null | tr -d ' ' || echo 0; }
op() {
  local kind=$1 n=$NEXT_OP extra='' lo=- out
  shift
  case $kind in
    snap) if [ "$2" = w ]; then lo=$(wstate 8); fi; echo "$n issue snap $1 $2 $lo" >>"$OPS" ;;
    create|resize) echo "$n issue $kind $1 $(( $2 << 20 ))" >>"$OPS" ;;
    *) echo "$n issue $kind $*" >>"$OPS" ;;
  esac
  case $kind in
    create) out=$(nbdctl volume create "$1" --size "${2}Mi" 2>&1) ;;
    resize) out=$(nbdctl volume resize "$1" --size "${2}Mi" 2>&1) ;;
    delete) out=$(nbdctl volume delete "$1" 2>&1) ;;
    snap) out=$(nbdctl snapshot create "$1" --volume "$2" --wait 2>&1) ;;
    delsnap) out=$(nbdctl snapshot delete "$1" 2>&1) ;;
  esac || fail "op $n ($kind $*): $out"
  [ "$kind" = snap ] && [ "$2" = w ] && extra=$(wstate 0)
  echo "$n ack $extra" >>"$OPS"
  dmsetup message "$LOGDM" 0 mark "c$n" || fail "mark c$n"
  NEXT_OP=$((n + 1))
}

echo "0 issue open" >>"$OPS"
PRELOAD=
if [ -n "$FAULT" ]; then PRELOAD=/opt/lib/libpowercut-fault.so; fi
NBDCSI_TEST_FAULT=$FAULT LD_PRELOAD=$PRELOAD nbd-datapathd --pool "$POOL" --api "unix://$API" \
  --nbd-listen "unix://$SOCK" --workers 2 --overcommit 8 --log-level info >>"$LOG" 2>&1 &
DPID=$!
for _ in $(seq 600); do [ -S "$API" ] && break; kill -0 "$DPID" 2>/dev/null || fail "nbd-datapathd exited"; sleep 0.1; done
[ -S "$API" ] || fail "nbd-datapathd did not start within 60 s"
echo "0 ack" >>"$OPS"; dmsetup message "$LOGDM" 0 mark c0; NEXT_OP=1
op create w 16
out=$(nbdctl -o json attach w) || fail "attach w: $out"
NBD=$(jq -r .device <<<"$out")
[ "$(cat "/sys/block/${NBD#/dev/}/queue/write_cache")" = "write back" ] ||
  fail "$NBD has no volatile write cache: the kernel would not send FLUSH, the test would prove nothing"
step "nbd-datapathd up (pid $DPID); w attached on $NBD (write back, fua $(cat "/sys/block/${NBD#/dev/}/queue/fua"))"

SEED=${POWERCUT_SEED:-$RANDOM}
echo "writer: up to $ROUNDS rounds, one every ${PAUSE_MS} ms, while $CYCLES churn cycles run; seed $SEED"
powercut-writer --dev "$NBD" --blocks 512 --rounds "$ROUNDS" --per-round 8 --fua-every 5 \
  --pause-ms "$PAUSE_MS" --stop-file "$W/churn.done" \
  --journal "$JOURNAL" --state "$WSTATE" --mark-dev "$LOGDM" --seed "$SEED" >"$W/writer.out" 2>&1 &
WPID=$!
# The writer's first three rounds run alone: a flush skipped there (POWERCUT_FAULT=skip-flush:2) can
# only be hidden by a flush of the churn's, so the self-check is deterministic.
for _ in $(seq 600); do
  if [ -f "$JOURNAL" ] && [ "$(wc -l <"$JOURNAL")" -ge 24 ]; then break; fi
  kill -0 "$WPID" 2>/dev/null || { cat "$W/writer.out"; fail "powercut-writer died"; }
  sleep 0.1
done
# Each cycle creates, grows and snapshots a volume, snapshots w under the writer's feet, and from
# the second on deletes what the previous cycle made: every kind of op within two cycles.
for i in $(seq "$CYCLES"); do
  op create "v$i" $((16 + 16 * (i % 3)))
  op resize "v$i" $((32 + 16 * (i % 3)))
  op snap "s$i" "v$i"
  op snap "ws$i" w
  if [ "$i" -gt 1 ]; then op delsnap "ws$((i - 1))"; op delsnap "s$((i - 1))"; op delete "v$((i - 1))"; fi
done
: >"$W/churn.done"
wait "$WPID" || { cat "$W/writer.out"; fail "powercut-writer failed"; }
WPID=
cat "$W/writer.out"
step "workload done: $((NEXT_OP)) ops acknowledged in $i churn cycles"

nbdctl detach w >/dev/null || fail "detach w"
kill -TERM "$DPID"; wait "$DPID" || fail "nbd-datapathd exited $? on SIGTERM"
DPID=
if [ -n "$FAULT" ]; then grep -c 'powercut-fault: skipped' "$LOG" | sed 's/^/fault: calls skipped: /'; fi
umount "$MNT"
dmsetup remove "$LOGDM" || fail "dmsetup remove $LOGDM"
losetup -d "$DATA"
rm -f "$W/data.img"   # the live image is no longer needed: the replay rebuilds every state of it
step "recording stopped: $(logwrites info "$W/log.img")"

# ---- replay ------------------------------------------------------------------------------------------
# Two workers (the VM's two CPUs), each with its own image, loop device, scratch COW and mount point.
WORKERS=()
for k in 0 1; do
  truncate -s "${POOL_MB}M" "$W/replay$k.img"; truncate -s 256M "$W/cow$k.img"
  b=$(losetup -f --show "$W/replay$k.img") c=$(losetup -f --show "$W/cow$k.img")
  mkdir -p "$CHK$k"
  WORKERS+=(--worker "$W/replay$k.img:$b:$c:$CHK$k")
done
step "replaying to every FLUSH, FUA and mark after mkfs"
args=(--log "$W/log.img" --fs "$FS" --journal "$JOURNAL" --ops "$OPS" --volume w --from-mark mkfs
      --overcommit 8 --max-points "$MAX_POINTS" "${WORKERS[@]}")
[ -z "$FAULT" ] || args+=(--stop-on-failure)
set +e; powercut-replay "${args[@]}" | tee "$W/replay.out"; rc=${PIPESTATUS[0]}; set -e
checked=$(sed -n 's/^powercut: .* crash points (\([0-9]*\) replayed and checked.*/\1/p' "$W/replay.out")
if [ -n "$FAULT" ]; then
  [ "$rc" = 1 ] || fail "SELF-CHECK: with $FAULT injected powercut-replay exited $rc, not 1 (no point failed?): the test cannot see that fault"
  step "PASS (self-check): the injected fault ($FAULT) was detected"
  exit 0
fi
[ "$rc" = 0 ] || fail "powercut-replay exited $rc (1: inconsistent crash points, see FAIL lines above; 3: could not run)"
[ "${checked:-0}" -ge 50 ] || fail "only ${checked:-0} points checked: the workload did not produce enough flushes"
step "PASS: $checked crash points consistent"
