#!/usr/bin/env bash
# The README's main command, end to end, on this machine (the fallback attach path when the kernel
# has no nbd.ko): scripts/quickstart.sh --no-build in a private state dir, asserting its own summary.
#   quickstart_test.sh full        one run; checksums match, df grew, the QoS change took effect
#   quickstart_test.sh interrupt   SIGINT midway, then SIGKILL of the datapath midway: after each,
#                                  nothing is left (mounts, loop devices, nbdfuse, daemons, sockets),
#                                  and the next full run starts clean and passes on the same pool
. "$(dirname "$0")/lib.sh"
lib_init
need jq fio findmnt losetup nbdfuse fusermount3 openssl python3
[ "$(id -u)" = 0 ] || skip "needs root (mount, loop devices)"
[ -c /dev/fuse ] || skip "no /dev/fuse"
mode=${1:-full}
QS=$NBDCSI_SRC/scripts/quickstart.sh
export NBDCSI_QS_DIR=$W/qs

run_qs() {  # run_qs LOGFILE -> exit code of the quickstart
  local rc=0
  NBDCSI_BIN=$NBDCSI_BIN "$QS" --no-build >"$1" 2>&1 || rc=$?
  return $rc
}

# Leftovers of a run: mounts under the state dir, loop devices backed by it, its nbdfuse
# processes and daemons, its sockets.
assert_clean() {
  local what=$1
  if findmnt -rn -o TARGET | grep -qF -- "$NBDCSI_QS_DIR/"; then
    findmnt -rn -o TARGET | grep -F -- "$NBDCSI_QS_DIR/" >&2
    die "$what: mounts left behind"
  fi
  if losetup -n -O BACK-FILE 2>/dev/null | grep -qF -- "$NBDCSI_QS_DIR/"; then
    die "$what: loop devices left behind: $(losetup -n -O NAME,BACK-FILE | grep -F -- "$NBDCSI_QS_DIR/")"
  fi
  if pgrep -f -- "$NBDCSI_QS_DIR" >/dev/null; then
    die "$what: processes left behind: $(pgrep -af -- "$NBDCSI_QS_DIR")"
  fi
  local s
  for s in controller node datapath nbd; do
    [ ! -e "$NBDCSI_QS_DIR/run/$s.sock" ] || die "$what: socket $s.sock left behind"
  done
}

expect_full_run() {  # expect_full_run LABEL
  local log=$W/$1.log rc=0
  run_qs "$log" || rc=$?
  [ $rc = 0 ] || { tail -n 40 "$log" >&2; tail -n 20 "$NBDCSI_QS_DIR"/run/*.log >&2 || true; die "$1: quickstart exited $rc"; }
  tail -n 1 "$log" | grep -qx "quickstart: OK" || die "$1: last line is not 'quickstart: OK'"
  grep -q "checksums match" "$log" || die "$1: the summary does not say the restore's checksums match"
  grep -Eq "Expand .* [0-9]+ -> [0-9]+ MiB" "$log" || die "$1: the summary has no df growth"
  grep -Eq "Change QoS .* [0-9]+ -> [0-9]+ IOPS" "$log" || die "$1: the summary has no QoS change"
  grep -Eq "^\[[0-9]+/[0-9]+\]" "$log" || die "$1: no step counter in the output"
  assert_clean "$1"
  step "$1: $(grep -E '^[0-9]+ .*(IOPS|MiB|checksums match)$' "$log" | sed 's/  */ /g' | tr '\n' ';')"
}

wait_for_line() {  # wait_for_line LOG REGEX SECONDS PID
  for _ in $(seq $(($3 * 10))); do
    grep -Eq "$2" "$1" 2>/dev/null && return 0
    kill -0 "$4" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

case $mode in
  full)
    step "full quickstart run"
    expect_full_run run1
    step "--keep: daemons and mounts stay up; --stop takes them down"
    NBDCSI_BIN=$NBDCSI_BIN "$QS" --no-build --keep >"$W/keep.log" 2>&1 || { tail -n 30 "$W/keep.log" >&2; die "--keep run failed"; }
    grep -q "stop: .*quickstart.sh --stop" "$W/keep.log" || die "--keep does not say how to stop"
    findmnt -rn -o TARGET | grep -qF -- "$NBDCSI_QS_DIR/mnt/pods/vol1/volume" || die "--keep left no mounted volume"
    [ -n "$(pgrep -f -- "$NBDCSI_QS_DIR/run/node.sock")" ] || die "--keep left no node plugin running"
    NBDCSI_BIN=$NBDCSI_BIN "$QS" --stop >"$W/stop.log" 2>&1 || { cat "$W/stop.log" >&2; die "--stop failed"; }
    assert_clean "after --stop"
    ;;
  interrupt)
    step "run 1: SIGINT while volumes are staged and mounted"
    # Background jobs of a non-interactive shell start with SIGINT ignored, and bash cannot trap a
    # signal ignored at entry: python restores the default disposition, as a terminal's Ctrl-C
    # would find it, then execs the quickstart.
    NBDCSI_BIN=$NBDCSI_BIN setsid "$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])' "$QS" --no-build >"$W/int.log" 2>&1 &
    qs=$!
    wait_for_line "$W/int.log" '^\[5/' 120 $qs || { cat "$W/int.log" >&2; die "run 1 never reached step 5"; }
    kill -INT -- -$qs
    rc=0; wait $qs || rc=$?
    [ $rc = 130 ] || { cat "$W/int.log" >&2; die "interrupted quickstart exited $rc, expected 130"; }
    grep -q "interrupted at step" "$W/int.log" || die "no 'interrupted at step' message"
    assert_clean "after SIGINT"

    step "run 2: SIGKILL of nbd-datapathd while the restored volume is being staged"
    NBDCSI_BIN=$NBDCSI_BIN setsid "$QS" --no-build >"$W/kill.log" 2>&1 &
    qs=$!
    wait_for_line "$W/kill.log" '^\[7/' 120 $qs || { cat "$W/kill.log" >&2; die "run 2 never reached step 7"; }
    kill -KILL "$(cat "$NBDCSI_QS_DIR/run/datapath.pid")"
    rc=0; wait $qs || rc=$?
    if [ $rc = 0 ]; then
      step "run 2 finished before the kill bit (it was at its last steps): fine, still checked"
    else
      grep -q "quickstart: FAILED at step" "$W/kill.log" || { cat "$W/kill.log" >&2; die "run 2 failed without naming the step"; }
      grep -q "logs: " "$W/kill.log" || die "run 2's failure does not say where the logs are"
    fi
    assert_clean "after SIGKILL of the datapath"

    step "run 3: a full run on the same pool starts clean and passes"
    expect_full_run run3
    "$NBDCSI_BIN/nbd-datapathd" --help >/dev/null
    ;;
  *) die "unknown mode $mode" ;;
esac
step "ok"
