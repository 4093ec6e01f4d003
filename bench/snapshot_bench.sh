#!/usr/bin/env bash
# Snapshot cost on a loop-mounted XFS reflink=1 pool on the host disk. Not a CTest test.
#   - latency of `nbdctl snapshot create` (wall) and the daemon's logged write pause, for
#     volumes of 1, 10 and 50 GiB with 1 GiB written, once sequentially (few extents) and once
#     in 64 KiB random writes (FICLONE time is linear in the extent count), REPS reps each;
#   - the I/O stall: fio 4k randwrite QD8 on the snapshotted volume, per-IO completion latency
#     log; max latency of IOs completing inside each snapshot window vs a run without snapshots;
#   - a neighbour volume's 4k randwrite QD8 IOPS while snapshots of another volume are taken
#     (and deleted) in a loop, vs without.
# Targets: pause < 50 ms at 10 GiB and flat with size; stall < 20 ms; neighbour >= 90 %.
# SNAP_IMG_PATH=/dev/shm/snap.img puts the pool's loop image in RAM: a loop device on a host file
# flushes the host's dirty pages of that file on every FLUSH, which dominates the measured stall.
#   bench/snapshot_bench.sh      REPS=5 RUNTIME=10 SIZES="1 10 50" FILLS="seq rand"
#                                BENCH_DIR=/var/tmp NBDCSI_BIN=build/bin
# The loop device does buffered I/O on its backing file, so an fdatasync under the pause also
# writes back the host's dirty pages of that file: the first snapshot after a fill pays for it.
. "$(dirname "$0")/../test/integration/lib.sh"
. "$(dirname "$0")/../test/integration/snap_lib.sh"
need fio mkfs.xfs xfs_bmap
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
REPS=${REPS:-5}
RUNTIME=${RUNTIME:-10}
SIZES=${SIZES:-"1 10 50"}
FILLS=${FILLS:-"seq rand"}
NBDCSI_SERVER=datapathd
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
lib_init
snap_pool_mount xfs 80G
# 50 + 10 + 1 GiB per fill mode plus a 10 GiB neighbour: thin volumes, overcommitted.
daemon_start "$POOL" -- --overcommit 4
snap_assert_pool xfs
R=$W/results
: >"$R"

# fill VOL seq|rand: 1 GiB written, sequentially in 1 MiB writes from the start (what nbdcopy
# of a 1 GiB image does: few extents) or in 64 KiB random writes across the whole volume (tens
# of thousands of extents; XFS FICLONE time is linear in the extent count).
fill() {
  local rw=write bs=1M
  [ "$2" = rand ] && { rw=randwrite; bs=64k; }
  fio --name=fill --ioengine=nbd --uri="$(nbd_uri "$1")" --rw=$rw --bs=$bs --iodepth=16 \
    --io_size=1G --norandommap --randrepeat=0 --output=/dev/null >/dev/null || die "fill $1 failed"
}
extents() { xfs_bmap "$POOL/volumes/$1.img" 2>/dev/null | grep -vc 'hole\|:$' || true; }

now_ms() { date +%s%3N; }

# snap_once VOL NAME: one snapshot; appends "wall_ms pause_ms" to $W/lat.VOL
snap_once() {
  local t0 t1 pause
  t0=$(now_ms)
  nbdctl snapshot create "$2" --volume "$1" >/dev/null || die "snapshot create $2 of $1 failed"
  t1=$(now_ms)
  pause=$(grep -F "snapshot $2 of volume $1 " "$W/datapathd.log" | tail -1 |
          sed -nE 's/.*writes paused ([0-9.]+) ms.*/\1/p')
  [ -n "$pause" ] || die "no 'writes paused' line for snapshot $2 in the daemon log"
  echo "$((t1 - t0)) $pause" >>"$W/lat.$1"
}

# The stall and neighbour runs use the 10 GiB volume (or the middle size) of the first fill mode.
SV=v$(echo "$SIZES" | awk '{ print $(NF > 1 ? 2 : 1) }')$(echo "$FILLS" | awk '{ print $1 }')
for mode in $FILLS; do
  for gi in $SIZES; do
    v=v$gi$mode
    vol_create "$v" "${gi}Gi"
    step "filling $v (1 GiB, $mode)"
    fill "$v" "$mode"
    # The loop device writes through the host's page cache: without this the first snapshot's
    # fdatasync would time the host's writeback of the fill, which a real disk does not have.
    sync "$SNAP_IMG"
    : >"$W/lat.$v"
    for r in $(seq "$REPS"); do
      snap_once "$v" "$v-s$r"
      nbdctl snapshot delete "$v-s$r" >/dev/null || die "snapshot delete failed"
    done
    echo "latency $v $gi $mode $(extents "$v") $(tr '\n' ' ' <"$W/lat.$v")" >>"$R"
    step "$v: $(tr '\n' ' ' <"$W/lat.$v")"
    [ "$v" = "$SV" ] || nbdctl volume delete "$v" >/dev/null || die "volume delete $v failed"
  done
done
stall_run() {  # stall_run TAG SNAPSHOT(0|1)
  local start
  fio --name=stall --ioengine=nbd --uri="$(nbd_uri "$SV")" --rw=randwrite --bs=4k --iodepth=8 \
    --size=1G --time_based --runtime="$RUNTIME" --write_lat_log="$W/$1" --log_avg_msec=0 \
    --output-format=json --output="$W/$1.json" >/dev/null &
  local fpid=$!
  start=$(now_ms)
  if [ "$2" = 1 ]; then
    local k=0
    sleep 2
    while [ $(( $(now_ms) - start )) -lt $(( (RUNTIME - 2) * 1000 )) ]; do
      k=$((k + 1))
      local a b
      a=$(now_ms); nbdctl snapshot create "stall$k" --volume "$SV" >/dev/null || die "snapshot during fio"; b=$(now_ms)
      echo "$((a - start)) $((b - start))" >>"$W/$1.windows"
      nbdctl snapshot delete "stall$k" >/dev/null || die "snapshot delete during fio"
      sleep 1
    done
  fi
  wait $fpid || die "fio $1 failed"
}
step "stall: fio 4k randwrite QD8 on $SV without snapshots"
stall_run base 0
step "stall: the same with a snapshot every ~1 s"
: >"$W/snap.windows"
stall_run snap 1
grep -F "of volume $SV " "$W/datapathd.log" | grep -F "snapshot stall" |
  sed -nE 's/.*writes paused ([0-9.]+) ms.*/\1/p' >"$W/snap.pauses"

# Neighbour: fio on a separate volume, alone and while $SV is snapshotted in a loop.
vol_create neighbour 10Gi
fill neighbour seq
nb_run() {
  fio --name=nb --ioengine=nbd --uri="$(nbd_uri neighbour)" --rw=randwrite --bs=4k --iodepth=8 \
    --size=1G --time_based --runtime="$RUNTIME" --output-format=json --output="$W/$1.json" >/dev/null
}
step "neighbour alone"
nb_run nb_solo || die "fio neighbour solo failed"
step "neighbour while $SV is snapshotted in a loop"
(
  k=0
  while :; do
    k=$((k + 1))
    nbdctl snapshot create "loop$k" --volume "$SV" >/dev/null || exit 1
    nbdctl snapshot delete "loop$k" >/dev/null || exit 1
    echo "$k" >"$W/loop.count"
  done
) &
loop=$!
nb_run nb_loop || die "fio neighbour with snapshots failed"
kill "$loop" 2>/dev/null; wait "$loop" 2>/dev/null || true  # 143: our own TERM
LOOPS=$(cat "$W/loop.count" 2>/dev/null || echo 0)
daemon_stop

"$PY" - "$W" "$R" "$SV" "$LOOPS" "$RUNTIME" <<'PY'
import glob, json, statistics, sys
w, results, sv, loops, runtime = sys.argv[1:]

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

print("### snapshot latency (XFS reflink=1 loop mount, 1 GiB written per volume)\n")
print("| volume | 1 GiB written as | data extents | reps | create wall p50 / max (ms) | writes paused p50 / max (ms) | pause < 50 ms |")
print("|---|---|---|---|---|---|---|")
pauses = {}
for line in open(results):
    _, vol, gi, mode, ext, *vals = line.split()
    wall = [float(x) for x in vals[0::2]]
    pause = [float(x) for x in vals[1::2]]
    pauses.setdefault(mode, {})[int(gi)] = statistics.median(pause)
    ok = "PASS" if max(pause) < 50 else "MISS"
    how = "1 MiB sequential" if mode == "seq" else "64 KiB random"
    print(f"| {gi} GiB | {how} | {ext} | {len(wall)} | {statistics.median(wall):.0f} / {max(wall):.0f} | "
          f"{statistics.median(pause):.2f} / {max(pause):.2f} | {ok} |")
for mode, p in pauses.items():
    if len(p) > 1:
        lo, hi = p[min(p)], p[max(p)]
        print(f"\n{mode}: pause p50 at {max(p)} GiB / at {min(p)} GiB = {hi / lo if lo else float('inf'):.2f}x (flat: ~1)")

def lat_log(tag):
    out = []
    for f in glob.glob(f"{w}/{tag}_clat.*.log"):
        for line in open(f):
            t, v = line.split(",")[:2]
            out.append((int(t), int(v) / 1e6))  # ms since job start, ms
    return out

base = [v for _, v in lat_log("base")]
snap = lat_log("snap")
windows = [tuple(map(int, l.split())) for l in open(f"{w}/snap.windows")]
inside = [v for t, v in snap if any(a - 20 <= t <= b + 100 for a, b in windows)]
print(f"\n### I/O stall on {sv} (fio 4k randwrite QD8, per-IO completion latency)\n")
print("| measurement | value | target |")
print("|---|---|---|")
print(f"| baseline (no snapshots): p99 / max completion latency | {pct(base, .99):.2f} / {max(base):.2f} ms | - |")
stall_pauses = [l.strip() for l in open(f"{w}/snap.pauses")]
print(f"| snapshots taken during the run | {len(windows)} (create wall {', '.join(str(b - a) for a, b in windows)} ms; "
      f"writes paused {', '.join(stall_pauses)} ms) | - |")
m = max(inside) if inside else float("nan")
print(f"| max completion latency inside a snapshot window (+100 ms) | {m:.2f} ms | < 20 ms: {'PASS' if m < 20 else 'MISS'} |")
print(f"| p99 during the snapshot run | {pct([v for _, v in snap], .99):.2f} ms | - |")

def iops(tag):
    return json.load(open(f"{w}/{tag}.json"))["jobs"][0]["write"]["iops"]
solo, loop = iops("nb_solo"), iops("nb_loop")
print(f"\n### neighbour volume (fio 4k randwrite QD8, {runtime} s)\n")
print("| measurement | value | target |")
print("|---|---|---|")
print(f"| neighbour alone | {solo:.0f} IOPS | - |")
print(f"| neighbour while {sv} is snapshotted + deleted in a loop ({loops} cycles) | {loop:.0f} IOPS ({loop / solo * 100:.0f} % of alone) | >= 90 %: {'PASS' if loop / solo >= .9 else 'MISS'} |")
PY
