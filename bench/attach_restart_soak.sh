#!/usr/bin/env bash
# Soak of the kernel-NBD restart path: test/vm/attach_restart.sh (fio verify on ext4 over /dev/nbdN
# while nbd-datapathd is kill -9'd and restarted, then LINK_DEAD repairs under a tight QoS limit,
# then detach + delete) run RUNS times in a row in the QEMU VM, with `stress-ng --cpu 2` loading
# the host beside it (the load under which the issue-12 engine bug showed). Not a CTest test:
# about 2-4 minutes per run under load.
#
#   bench/attach_restart_soak.sh [--runs N] [--bin DIR] [--no-load]
#     --runs N   default 30
#     --bin DIR  where nbd-datapathd and nbdctl are (default build/bin; build-asan/bin for ASan)
#     --no-load  no stress-ng beside the VM
# Prints one line per run (result, seconds, LINK_DEAD repairs, restarts seen) and a summary; keeps
# every run's console output in $SOAK_DIR (default /var/tmp/nbdcsi-soak.<date>). Exit 0 only when
# every run passed.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=30 BIN=build/bin LOAD=1
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --no-load) LOAD=0; shift ;;
    *) echo "usage: $0 [--runs N] [--bin DIR] [--no-load]" >&2; exit 2 ;;
  esac
done
for b in nbd-datapathd nbdctl; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b: build first (scripts/build.sh)" >&2; exit 2; }
done
if [ "$LOAD" = 1 ] && ! command -v stress-ng >/dev/null; then
  echo "installing stress-ng (Debian package)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q stress-ng >/dev/null
fi
SOAK_DIR=${SOAK_DIR:-/var/tmp/nbdcsi-soak.$(date +%Y%m%d-%H%M%S)}
mkdir -p "$SOAK_DIR"
STRESS=''
cleanup() { [ -n "$STRESS" ] && kill "$STRESS" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
if [ "$LOAD" = 1 ]; then
  # Bounded: it ends by itself even if this script is killed without its trap.
  stress-ng --cpu 2 --timeout $((RUNS * 600))s --quiet &
  STRESS=$!
fi
echo "attach_restart soak: $RUNS runs, binaries $BIN ($(file -b "$BIN/nbd-datapathd" | cut -c1-40)...), load: $([ "$LOAD" = 1 ] && echo 'stress-ng --cpu 2' || echo none), logs in $SOAK_DIR"
pass=0 fail=0 times=()
for i in $(seq "$RUNS"); do
  log=$SOAK_DIR/run-$i.log
  t0=$(date +%s)
  rc=0
  CI=true test/vm/nbd-kernel-vm --timeout 900 --mem 1536 \
    --file test/vm/lib.sh:/opt/lib/nbdcsi-vm.sh \
    --file "$BIN/nbd-datapathd:/opt/bin/" --file "$BIN/nbdctl:/opt/bin/" \
    test/vm/attach_restart.sh >"$log" 2>&1 || rc=$?
  dt=$(( $(date +%s) - t0 ))
  times+=("$dt")
  repairs=$(grep -c 'the kernel dropped a connection' "$log" || true)
  restarts=$(grep -c 'restarted, device reconfigured' "$log" || true)
  if [ "$rc" = 0 ] && grep -q 'PASS' "$log"; then
    pass=$((pass + 1)); res=pass
  else
    fail=$((fail + 1)); res="FAIL (exit $rc: $(grep -m1 '^FAIL' "$log" || tail -n1 "$log"))"
  fi
  # The host's 1-minute load average at the end of the run: the load the VM really ran under.
  printf 'run %2d/%d: %-6s %4ss  LINK_DEAD repairs %s, restarts %s, host load %s\n' "$i" "$RUNS" \
    "$res" "$dt" "$repairs" "$restarts" "$(cut -d' ' -f1 /proc/loadavg)"
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
echo "summary: $pass/$RUNS passed, $fail failed; seconds per run min $(head -n1 <<<"$sorted")" \
  "median $(sed -n "$(( (RUNS + 1) / 2 ))p" <<<"$sorted") max $(tail -n1 <<<"$sorted")"
[ "$fail" = 0 ]
