#!/usr/bin/env bash
# nbd-datapathd's memory with many volumes in use: VOLUMES volumes (default 100), one open NBD
# connection each, every connection having done one 4 KiB read and one 64 KiB write. Prints the
# daemon's VmRSS and VmHWM (/proc/PID/status) at each stage as a Markdown table, against the
# 64 MiB goal. Not a CTest test; ~20 s.
#
#   bench/rss_bench.sh                 VOLUMES=100 HOLD=5 BENCH_DIR=/var/tmp NBDCSI_BIN=build/bin
#
# The clients are one python3 process with one libnbd handle per volume (the nbd module ships
# with libnbd's Python binding), so the bench starts 1 + 1 processes and the lib.sh trap ends both.
. "$(dirname "$0")/../test/integration/lib.sh"
VOLUMES=${VOLUMES:-100}
HOLD=${HOLD:-5}          # seconds the connections stay open after the last I/O, RSS sampled each
GOAL_KIB=$((64 * 1024))
NBDCSI_SERVER=datapathd
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
"$PY" -c 'import nbd' 2>/dev/null || skip "needs the libnbd Python binding (python3-libnbd)"
lib_init

kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }
stages=()
peak=0  # the kernel updates VmHWM lazily (it may read below an earlier VmRSS): keep the largest
sample() {  # STAGE
  local r h; r=$(kib "$DAEMON_PID" VmRSS); h=$(kib "$DAEMON_PID" VmHWM)
  [ "$r" -gt "$peak" ] && peak=$r
  [ "$h" -gt "$peak" ] && peak=$h
  stages+=("| $1 | $(kib "$DAEMON_PID" VmRSS) | $(kib "$DAEMON_PID" VmHWM) |")
  step "$1: VmRSS $(kib "$DAEMON_PID" VmRSS) KiB, VmHWM $(kib "$DAEMON_PID" VmHWM) KiB"
}

daemon_start
sample "started, no volume"
for i in $(seq "$VOLUMES"); do vol_create "v$i" 64Mi; done
sample "$VOLUMES volumes, no connection"

cat >"$W/clients.py" <<'PY'
# One handle per URI on argv; each reads 4 KiB and writes 64 KiB, then all stay connected until
# the "go" file disappears or `hold_max` seconds pass (bounded even if the bench is killed -9).
import nbd, os, sys, time
ready, go, hold_max = sys.argv[1], sys.argv[2], float(sys.argv[3])
handles = []
for uri in sys.argv[4:]:
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, 0)
    h.pwrite(b"x" * 65536, 1 << 20)
    handles.append(h)
open(ready, "w").close()
deadline = time.monotonic() + hold_max
while os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.1)
for h in handles:
    h.shutdown()
PY
uris=()
for i in $(seq "$VOLUMES"); do uris+=("$(nbd_uri "v$i")"); done
touch "$W/go"
bg "$PY" "$W/clients.py" "$W/ready" "$W/go" "$((HOLD + 60))" "${uris[@]}"
clients=$BG_PID
wait_for 60 test -f "$W/ready" || die "the $VOLUMES clients did not connect within 60 s"
conns=$(ss -xHn state connected 2>/dev/null | awk -v s="$NBD_SOCK" '$5 == s' | wc -l)
[ "$conns" -ge "$VOLUMES" ] || die "$conns NBD connections open, want $VOLUMES"
sample "$VOLUMES volumes, $conns connections open, after I/O"
for _ in $(seq "$HOLD"); do sleep 1; done
sample "$VOLUMES volumes, $conns connections, ${HOLD} s later"
rss=$(kib "$DAEMON_PID" VmRSS)
rm -f "$W/go"
wait "$clients" || die "the clients failed"
sample "connections closed"

daemon_stop
echo "nbd-datapathd, $VOLUMES volumes with one NBD connection each (goal: RSS < 64 MiB)"
echo
echo "| stage | VmRSS (KiB) | VmHWM (KiB) |"
echo "|---|---|---|"
printf '%s\n' "${stages[@]}"
echo
mark=MISS; [ "$peak" -lt "$GOAL_KIB" ] && mark=PASS
echo "peak (largest VmHWM or VmRSS seen) $((peak / 1024)) MiB, RSS with the connections open $((rss / 1024)) MiB: < 64 MiB $mark"
