#!/usr/bin/env bash
# Snapshot cost on a loop-mounted XFS reflink=1 pool on the host disk. Not a CTest test.
#   - latency of `nbdctl snapshot create` (wall) and the daemon's logged write pause, for
#     volumes of 1, 10 and 50 GiB with 1 GiB written in 64 KiB random chunks (so the extent
#     count, which FICLONE is linear in, is realistic), REPS repetitions each;
#   - the I/O stall: fio 4k randwrite QD8 on the snapshotted volume, per-IO completion latency
#     log; max latency of IOs completing inside each snapshot window vs a run without snapshots;
#   - a neighbour volume's 4k randwrite QD8 IOPS while snapshots of another volume are taken
#     (and deleted) in a loop, vs without.
# Targets: pause < 50 ms at 10 GiB and flat with size; stall < 20 ms; neighbour >= 90 %.
#   bench/snapshot_bench.sh      REPS=5 RUNTIME=10 BENCH_DIR=/var/tmp NBDCSI_BIN=build/bin
. "$(dirname "$0")/../test/integration/lib.sh"
. "$(dirname "$0")/../test/integration/snap_lib.sh"
need fio mkfs.xfs
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
REPS=${REPS:-5}
RUNTIME=${RUNTIME:-10}
SIZES=${SIZES:-"1 10 50"}
NBDCSI_SERVER=datapathd
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
lib_init
snap_pool_mount xfs 80G
daemon_start "$POOL"
snap_assert_pool xfs
R=$W/results
: >"$R"

fill() {  # 1 GiB in 64 KiB random writes across the whole volume
  fio --name=fill --ioengine=nbd --uri="$(nbd_uri "$1")" --rw=randwrite --bs=64k --iodepth=16 \
    --io_size=1G --norandommap --randrepeat=0 --output=/dev/null >/dev/null || die "fill $1 failed"
}

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

for gi in $SIZES; do
  vol_create "v$gi" "${gi}Gi"
  step "filling v$gi (1 GiB in 64 KiB random writes)"
  fill "v$gi"
  : >"$W/lat.v$gi"
  for r in $(seq "$REPS"); do
    snap_once "v$gi" "v$gi-s$r"
    nbdctl snapshot delete "v$gi-s$r" >/dev/null || die "snapshot delete failed"
  done
  echo "latency v$gi $gi $(tr '\n' ' ' <"$W/lat.v$gi")" >>"$R"
  step "v$gi: $(tr '\n' ' ' <"$W/lat.v$gi")"
done

# Stall: fio on the 10 GiB volume (or the middle size), snapshots at fixed offsets into the run.
SV=v$(echo "$SIZES" | awk '{ print $(NF > 1 ? 2 : 1) }')
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

# Neighbour: fio on a separate volume, alone and while $SV is snapshotted in a loop.
vol_create neighbour 10Gi
fill neighbour
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
kill "$loop" 2>/dev/null; wait "$loop" 2>/dev/null
LOOPS=$(cat "$W/loop.count" 2>/dev/null || echo 0)
daemon_stop

"$PY" - "$W" "$R" "$SV" "$LOOPS" "$RUNTIME" <<'PY'
import glob, json, statistics, sys
w, results, sv, loops, runtime = sys.argv[1:]

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

print("### snapshot latency (XFS reflink=1 loop mount, 1 GiB written in 64 KiB random writes)\n")
print("| volume | reps | create wall p50 / max (ms) | writes paused p50 / max (ms) | target (pause < 50 ms, flat) |")
print("|---|---|---|---|---|")
pauses = {}
for line in open(results):
    _, vol, gi, *vals = line.split()
    wall = [float(x) for x in vals[0::2]]
    pause = [float(x) for x in vals[1::2]]
    pauses[int(gi)] = statistics.median(pause)
    ok = "PASS" if max(pause) < 50 else "MISS"
    print(f"| {gi} GiB | {len(wall)} | {statistics.median(wall):.0f} / {max(wall):.0f} | "
          f"{statistics.median(pause):.2f} / {max(pause):.2f} | {ok} |")
if len(pauses) > 1:
    lo, hi = pauses[min(pauses)], pauses[max(pauses)]
    print(f"\npause p50 at {max(pauses)} GiB / at {min(pauses)} GiB: {hi / lo if lo else float('inf'):.2f}x")

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
print(f"| snapshots taken during the run | {len(windows)} (create wall {', '.join(str(b - a) for a, b in windows)} ms) | - |")
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
