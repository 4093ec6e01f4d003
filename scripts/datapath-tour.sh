#!/usr/bin/env bash
# A tour of the datapath alone, without CSI (scripts/quickstart.sh is the whole driver): installs
# what is missing, builds, and runs nbd-datapathd on a local pool: a volume with QoS, real NBD
# clients writing and verifying data, live QoS change, stats, resize, and a clean teardown.
#
#   scripts/datapath-tour.sh [--pool DIR] [--keep] [--no-build]
#     --pool DIR   pool directory (default ./.nbd-csi/tour-pool)
#     --keep       leave nbd-datapathd running at the end and print how to use and stop it
#     --no-build   use the binaries already in build/bin (or $NBDCSI_BIN); for the test suite
#
# State (socket, pid, log) lives in ./.nbd-csi/tour-run, or $NBDCSI_TOUR_DIR/tour-run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${NBDCSI_TOUR_DIR:-$ROOT/.nbd-csi}
POOL=$STATE/tour-pool
KEEP=0
BUILD=1
while [ $# -gt 0 ]; do
  case $1 in
    --pool) POOL=$(realpath -m "$2"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "datapath-tour: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

RUN=$(realpath -m "$STATE")/tour-run
LOG=$RUN/nbd-datapathd.log
API=unix://$RUN/datapath.sock
NBD=$RUN/nbd.sock
BIN=${NBDCSI_BIN:-$ROOT/build/bin}
VOL=tour-vol
TOTAL=9
DPID=

. "$ROOT/scripts/lib/steps.sh"
fail() {
  echo >&2
  echo "datapath-tour: FAILED at step $STEP ($STEP_NAME): $*" >&2
  echo "datapath-tour: daemon log: $LOG" >&2
  exit 1
}
cleanup() {
  local rc=$?
  if [ -n "$DPID" ] && kill -0 "$DPID" 2>/dev/null && { [ $KEEP = 0 ] || [ $rc != 0 ]; }; then
    kill -TERM "$DPID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DPID" 2>/dev/null || true
  fi
  exit $rc
}
trap cleanup EXIT
trap 'fail "command failed (exit $?): $BASH_COMMAND"' ERR
trap 'echo; echo "datapath-tour: interrupted"; exit 130' INT TERM

nbdctl() { "$BIN/nbdctl" --api "$API" "$@"; }
uri() { echo "nbd+unix:///$1?socket=$NBD"; }

step "Install missing packages and build"
if [ $BUILD = 1 ]; then
  ./scripts/deps.sh all
  ./scripts/build.sh >/dev/null || fail "build failed: run ./scripts/build.sh to see why"
  done_step
else
  for t in nbd-datapathd nbdctl; do [ -x "$BIN/$t" ] || fail "--no-build: $BIN/$t is missing"; done
  done_step "skipped (--no-build)"
fi

step "Start nbd-datapathd on pool $POOL"
mkdir -p "$RUN" "$POOL"
if [ -S "$NBD" ] && nbdinfo --list "nbd+unix://?socket=$NBD" >/dev/null 2>&1; then
  fail "a daemon is already serving $NBD (a previous --keep run?): stop it with: kill \$(cat $RUN/pid)"
fi
"$BIN/nbd-datapathd" --pool "$POOL" --api "$API" --nbd-listen "unix://$NBD" >"$LOG" 2>&1 &
DPID=$!
echo $DPID >"$RUN/pid"
for _ in $(seq 100); do
  [ -S "$RUN/datapath.sock" ] && [ -S "$NBD" ] && break
  kill -0 $DPID 2>/dev/null || fail "nbd-datapathd exited: $(tail -3 "$LOG")"
  sleep 0.05
done
[ -S "$RUN/datapath.sock" ] || fail "nbd-datapathd did not open its sockets in 5 s"
echo "      pid $DPID, api $API, nbd unix://$NBD"
done_step

step "Create a 1Gi volume capped at 2000 read IOPS"
nbdctl volume delete "$VOL" >/dev/null 2>&1 || true
nbdctl volume create "$VOL" --size 1Gi --max-read-iops 2000 >/dev/null || fail "volume create"
nbdctl volume list
done_step

step "Inspect the export with nbdinfo (an independent NBD client)"
nbdinfo "$(uri $VOL)" | grep -E 'export-size|can_(flush|fua|trim|zero|multi_conn)|base:allocation|block_size' |
  sed 's/^/      /'
done_step

step "Write 64 MiB of random data with nbdcopy and verify it"
DATA=$RUN/random.bin
head -c 64M /dev/urandom >"$DATA"
nbdcopy "$DATA" "$(uri $VOL)" || fail "nbdcopy write"
SUM_IN=$(sha256sum <"$DATA" | cut -d' ' -f1)
rm -f "$RUN/readback.bin"
nbdcopy "$(uri $VOL)" "$RUN/readback.bin" || fail "nbdcopy read"
SUM_OUT=$(head -c 64M "$RUN/readback.bin" | sha256sum | cut -d' ' -f1)
rm -f "$RUN/readback.bin"
[ "$SUM_IN" = "$SUM_OUT" ] || fail "checksum mismatch: wrote $SUM_IN, read $SUM_OUT"
echo "      sha256 $SUM_IN matches"
nbdinfo --map "$(uri $VOL)" | sed 's/^/      map: /'
done_step "sha256 match"

fio_read_iops() {  # fio_read_iops SECONDS -> 4k randread QD32 IOPS through fio's nbd engine
  fio --name=q --ioengine=nbd --uri="$(uri $VOL)" --rw=randread --bs=4k --iodepth=32 \
    --size=64M --runtime="$1" --time_based=1 --output-format=json --output="$RUN/fio.json" \
    >/dev/null 2>&1 || fail "fio failed: see $RUN/fio.json"
  jq '.jobs[0].read.iops | floor' "$RUN/fio.json"
}

step "Measure the QoS cap (2000 read IOPS), then raise it live to 5000"
I1=$(fio_read_iops 3)
echo "      capped at 2000: measured $I1 IOPS"
nbdctl volume qos "$VOL" --max-read-iops 5000 >/dev/null || fail "volume qos"
I2=$(fio_read_iops 3)
echo "      raised to 5000: measured $I2 IOPS"
awk -v a="$I1" 'BEGIN { exit !(a > 1700 && a < 2300) }' || fail "cap 2000 measured $I1 IOPS"
awk -v a="$I2" 'BEGIN { exit !(a > 4250 && a < 5750) }' || fail "cap 5000 measured $I2 IOPS"
done_step "$I1 -> $I2 IOPS"

step "Per-volume stats"
nbdctl stats "$VOL"
done_step

step "Grow the volume online to 2Gi"
nbdctl volume resize "$VOL" --size 2Gi >/dev/null || fail "resize"
SIZE=$(nbdinfo --size "$(uri $VOL)")
[ "$SIZE" = $((2 << 30)) ] || fail "a new connection sees $SIZE bytes, expected 2Gi"
echo "      a new connection sees $SIZE bytes"
done_step "2Gi"

if [ $KEEP = 1 ]; then
  TOTAL=$STEP
  printf '\nLeft running (--keep):\n'
  echo "  nbdctl:   $BIN/nbdctl --api $API volume list"
  echo "  NBD URI:  $(uri $VOL)"
  echo "  log:      $LOG"
  echo "  stop:     kill \$(cat $RUN/pid)"
else
  step "Tear down: delete the volume, stop the daemon"
  nbdctl volume delete "$VOL" >/dev/null || fail "delete"
  kill -TERM $DPID
  wait $DPID || fail "nbd-datapathd exited with an error on SIGTERM"
  DPID=
  [ ! -e "$NBD" ] || fail "the NBD socket was left behind"
  done_step
fi

print_summary
echo "datapath-tour: OK"
