#!/usr/bin/env bash
# QoS accuracy and isolation: a volume capped at 2000 read IOPS under fio QD32 (target: within
# 5 % of the cap) while an uncapped neighbour runs the same load at the same time (target: at
# least 90 % of what the neighbour gets alone). Not a CTest test.
#   bench/qos_bench.sh        RUNTIME=10 RAMP=2 CAP=2000 BENCH_DIR=/var/tmp NBDCSI_BIN=build/bin
. "$(dirname "$0")/../test/integration/lib.sh"
need fio nbdcopy jq
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
CAP=${CAP:-2000}
NBDCSI_SERVER=datapathd
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
lib_init
daemon_start
vol_create capped 1Gi --max-read-iops "$CAP"
vol_create neighbour 1Gi
step "write 512 MiB of data into both volumes (reads must hit data, not holes)"
head -c $((512 << 20)) /dev/urandom >"$W/data"
for v in capped neighbour; do nbdcopy "$W/data" "$(nbd_uri "$v")" || die "fill $v failed"; done
rm -f "$W/data"

run() {  # run VOLUME OUT -> fio randread 4k QD32 over the written half
  fio --name="$1" --ioengine=nbd --uri="$(nbd_uri "$1")" --rw=randread --bs=4k --iodepth=32 \
    --size=512M --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
    --output-format=json --output="$2" >/dev/null
}
iops() { jq -r '.jobs[0].read.iops' "$1"; }

# A first pass warms whatever caches the host has, so "alone" and "together" start equal.
step "warm-up"
RUNTIME=2 RAMP=0 run neighbour "$W/warm.json" || die "fio warm-up failed"
step "neighbour alone"
run neighbour "$W/solo.json" || die "fio solo failed"
step "capped and neighbour together"
run capped "$W/capped.json" & p1=$!
run neighbour "$W/together.json" & p2=$!
wait $p1 || die "fio capped failed"
wait $p2 || die "fio neighbour failed"
daemon_stop

"$PY" - "$CAP" "$(iops "$W/capped.json")" "$(iops "$W/solo.json")" "$(iops "$W/together.json")" "$RUNTIME" <<'PY'
import sys
cap, capped, solo, together, rt = float(sys.argv[1]), *map(float, sys.argv[2:5]), sys.argv[5]
err = (capped - cap) / cap * 100
share = together / solo * 100
print(f"runtime {rt} s per run, 4k randread QD32, fio nbd engine\n")
print("| measurement | value | target | result |")
print("|---|---|---|---|")
print(f"| capped volume ({cap:.0f} read IOPS cap) | {capped:.0f} IOPS ({err:+.1f} %) | {cap:.0f} +-5 % | {'PASS' if abs(err) <= 5 else 'MISS'} |")
print(f"| uncapped neighbour, alone | {solo:.0f} IOPS | - | - |")
print(f"| uncapped neighbour, next to the capped one | {together:.0f} IOPS ({share:.0f} % of alone) | >= 90 % | {'PASS' if share >= 90 else 'MISS'} |")
PY
