#!/usr/bin/env bash
# CreateVolume at cluster scale (issue 16, "Scale: the catalogue in etcd"): the real
# nbd-csi-controller with --cluster-etcd, a real etcd on 127.0.0.31, and nbdcsi-node-sim playing
# NODES datapaths on loopback (each heartbeats to the controller, serves the Datapath API on its
# own port from an in-memory pool, and is registered in etcd under its own lease). For each node
# count, COUNT sequential CreateVolume calls over the CSI socket, timed on the client, then the
# deletes, on both paths of one controller:
#   catalogue  replicas: "2": one etcd read, the live nodes from etcd, the entry, two creates;
#   fan-out    a single-node volume: every live node is asked GetVolume(name) first
#              (idempotency), then one create.
# Catalogue first, so its memory figure is not the fan-out's. Also, per path: the controller's
# RSS (VmRSS, and the peak VmHWM) and threads after it (and after registration); the CPU time the
# controller, etcd and the simulator spent meanwhile (creates and deletes, plus the heartbeats and
# lease keepalives that go on: all share the machine's cores); etcd's KV calls with their mean
# server-side time, and its WAL fsyncs with their mean (etcd --metrics=extensive). Issue 16's
# goal: catalogue p99 < 20 ms at 1,000 nodes. Prints a Markdown table. Not a CTest test; it fails
# only when a call or the setup fails, never on speed.
#
#   bench/catalogue_bench.sh     # ~10 min with the defaults, most of it the 1,000-node fan-out
#   BENCH_NODES="10 100 1000"  BENCH_PATHS="catalogue fanout" ("again": the catalogue path once
#   more, once the controller has dialled the nodes the first pass placed on)  BENCH_COUNT=300
#   BENCH_HEARTBEAT_MS=2000 (the controller's default)  BENCH_LEASE_TTL=10 (nbd-datapathd's
#   default)  BENCH_DIR=/tmp  NBDCSI_BIN=build/bin
#   BENCH_ETCD_DIR=/dev/shm (etcd's data; default the work dir, on BENCH_DIR's disk)
#   BENCH_PERF=1 (perf record -g on the controller during the last point's catalogue calls; the
#   report's summary goes to stderr)
. "$(dirname "$0")/../test/integration/lib.sh"
need etcd etcdctl
NODES=${BENCH_NODES:-"10 100 1000"}
PATHS=${BENCH_PATHS:-"catalogue fanout"}
for path in $PATHS; do
  case $path in catalogue | again | fanout) ;; *) die "BENCH_PATHS: $path is not catalogue, again or fanout" ;; esac
done
COUNT=${BENCH_COUNT:-300}
HB_MS=${BENCH_HEARTBEAT_MS:-2000}
LEASE_TTL=${BENCH_LEASE_TTL:-10}
for b in nbd-csi-controller nbdcsi-node-sim catalogue_bench; do
  [ -x "$NBDCSI_BIN/$b" ] || die "no $NBDCSI_BIN/$b (build the $b target)"
done
if [ -n "${BENCH_PERF:-}" ]; then need perf; fi
# Per node: a Datapath API listener and a heartbeat connection in the simulator, a connection
# in the controller; plus gRPC's own.
max_nodes=$(tr ' ' '\n' <<<"$NODES" | sort -n | tail -1)
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((4 * max_nodes + 256)) ] || die "needs ulimit -n >= $((4 * max_nodes + 256))"

W=$(mktemp -d "${BENCH_DIR:-/tmp}/nbdcsi-catbench.XXXXXX")
trap _lib_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
ED=$W
if [ -n "${BENCH_ETCD_DIR:-}" ]; then
  ED=$(mktemp -d "$BENCH_ETCD_DIR/nbdcsi-catbench-etcd.XXXXXX")
  on_exit rm -rf "$ED"
fi

free_port_on() {  # free_port_on IP
  "$PY" -c "import socket; s = socket.socket(); s.bind(('$1', 0)); print(s.getsockname()[1])"
}
# "RSS_MiB HWM_MiB threads" of a process.
mem_of() {
  awk '/^VmRSS:/ {r = $2} /^VmHWM:/ {h = $2} /^Threads:/ {t = $2}
       END {printf "%.1f %.1f %d\n", r / 1024, h / 1024, t}' "/proc/$1/status"
}
# CPU seconds (user + system) a process has used so far.
cpu_of() {
  awk -v t="$(cpu_ticks "$1")" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f\n", t / hz }'
}
cpu_all() { echo "$(cpu_of "$CTL") $(cpu_of "$ETCD_PID") $(cpu_of "$SIM")"; }
# "a/b/c" CPU seconds spent between two cpu_all readings.
cpu_delta() {
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
    printf "%.1f/%.1f/%.1f", y[1] - x[1], y[2] - x[2], y[3] - x[3] }'
}
# "kv_calls kv_seconds fsyncs fsync_seconds" of etcd so far (its /metrics, --metrics=extensive):
# the KV calls (Range, Txn, ...: the controller's, the simulator makes none once registered) and
# the WAL fsyncs, to tell etcd's and its disk's share of a call.
etcd_of() {
  curl -sf "http://$ETCD/metrics" | awk '
    /^grpc_server_handling_seconds_count\{.*grpc_service="etcdserverpb.KV"/ {kc += $2}
    /^grpc_server_handling_seconds_sum\{.*grpc_service="etcdserverpb.KV"/ {ks += $2}
    /^etcd_disk_wal_fsync_duration_seconds_count/ {fc = $2}
    /^etcd_disk_wal_fsync_duration_seconds_sum/ {fs = $2}
    END {printf "%d %.6f %d %.6f\n", kc, ks, fc, fs}'
}
# "KV_CALLS/MEAN_ms FSYNCS/MEAN_ms" between two etcd_of readings.
etcd_delta() {
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
    k = y[1] - x[1]; f = y[3] - x[3];
    printf "%d/%.2f %d/%.2f", k, (k > 0 ? (y[2] - x[2]) * 1000 / k : 0),
                              f, (f > 0 ? (y[4] - x[4]) * 1000 / f : 0) }'
}
# Stops this point's daemons (the trap stops them too if we die first).
stop_point() {
  local pid
  for pid in "${LIB_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${LIB_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  LIB_PIDS=()
}

declare -A RES  # RES[N,path] = "create_p50 create_p99 create_max delete_p50 delete_p99 errors cpu kv fsyncs"
declare -A MEM  # MEM[N,when] = "rss hwm threads"
declare -A IDLE  # IDLE[N] = CPU seconds per second of controller/etcd/sim with no CSI calls
rc=0
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for n in $NODES; do
  P=$W/n$n
  mkdir -p "$P"
  step "$n nodes: etcd, controller, simulator"
  E_IP=127.0.0.31
  E_PORT=$(free_port_on $E_IP)
  E_PEER=$(free_port_on $E_IP)
  ETCD=$E_IP:$E_PORT
  bg etcd --name=bench --data-dir="$ED/etcd-$n" --listen-client-urls="http://$ETCD" \
    --advertise-client-urls="http://$ETCD" --listen-peer-urls="http://$E_IP:$E_PEER" \
    --initial-advertise-peer-urls="http://$E_IP:$E_PEER" \
    --initial-cluster="bench=http://$E_IP:$E_PEER" --initial-cluster-state=new --logger=zap \
    --log-level=warn --log-outputs="$P/etcd.log" --metrics=extensive 2>>"$P/etcd.stderr"
  ETCD_PID=$BG_PID
  wait_for 30 etcdctl --endpoints="$ETCD" get /ready || die "etcd did not start (see $P/etcd.log)"

  REG=$(free_port_on 127.0.0.1)
  bg "$NBDCSI_BIN/nbd-csi-controller" --csi-endpoint "unix://$P/csi.sock" \
    --registry-listen "127.0.0.1:$REG" --insecure --heartbeat-interval "$HB_MS" \
    --cluster-etcd "$ETCD" --cluster-etcd-insecure >"$P/controller.log" 2>&1
  CTL=$BG_PID
  wait_for 20 test -S "$P/csi.sock" || { tail "$P/controller.log" >&2; die "no CSI socket"; }

  bg "$NBDCSI_BIN/nbdcsi-node-sim" --nodes "$n" --controller "127.0.0.1:$REG" --etcd "$ETCD" \
    --cluster-lease-ttl "$LEASE_TTL" --heartbeat-interval "$HB_MS" --ready-file "$P/ready" \
    2>"$P/sim.log"
  SIM=$BG_PID
  wait_for 180 test -f "$P/ready" || { tail "$P/sim.log" >&2; die "the simulated nodes did not register"; }
  live=$(etcdctl --endpoints="$ETCD" get --prefix --keys-only /nbd-csi/nodes/ | grep -c . || true)
  [ "$live" -ge "$n" ] || die "only $live of $n nodes alive in etcd"
  # A full heartbeat round after the last first heartbeat, so every node's figures are in; the
  # CPU spent meanwhile is the background (heartbeats, keepalives) every call competes with.
  idle_s=$(awk -v ms="$HB_MS" 'BEGIN { print ms / 1000 + 0.5 }')
  cpu0=$(cpu_all)
  sleep "$idle_s"
  IDLE[$n]=$(awk -v a="$cpu0" -v b="$(cpu_all)" -v t="$idle_s" 'BEGIN {
    split(a, x, " "); split(b, y, " ");
    printf "%.2f/%.2f/%.2f", (y[1] - x[1]) / t, (y[2] - x[2]) / t, (y[3] - x[3]) / t }')
  MEM[$n,reg]=$(mem_of "$CTL")

  for path in $PATHS; do
    step "$n nodes: $COUNT CreateVolume + DeleteVolume, $path"
    replicas=1
    [ $path != fanout ] && replicas=2
    PERF=
    if [ -n "${BENCH_PERF:-}" ] && [ "$n" = "$max_nodes" ] && [ $path = catalogue ]; then
      perf record -g -o "$P/perf.data" -p "$CTL" >/dev/null 2>&1 &
      PERF=$!
    fi
    cpu0=$(cpu_all)
    etcd0=$(etcd_of)
    if ! "$NBDCSI_BIN/catalogue_bench" --endpoint "unix://$P/csi.sock" --count "$COUNT" \
        --replicas $replicas --name-prefix "pvc-$path" >"$P/$path.out" 2>"$P/$path.err"; then
      echo "catalogue_bench ($path, $n nodes) failed:" >&2
      cat "$P/$path.err" >&2
      rc=1
    fi
    c=($(awk '$1 == "CreateVolume" {print $4, $5, $6, $3}' "$P/$path.out"))
    d=($(awk '$1 == "DeleteVolume" {print $4, $5, $3}' "$P/$path.out"))
    [ ${#c[@]} = 4 ] && [ ${#d[@]} = 3 ] || die "no result from catalogue_bench ($path): $(cat "$P/$path.err")"
    RES[$n,$path]="${c[0]} ${c[1]} ${c[2]} ${d[0]} ${d[1]} $((c[3] + d[2])) $(cpu_delta "$cpu0" "$(cpu_all)") $(etcd_delta "$etcd0" "$(etcd_of)")"
    MEM[$n,$path]=$(mem_of "$CTL")
    if [ -n "$PERF" ]; then
      kill -INT "$PERF"; wait "$PERF" || true
      perf report -i "$P/perf.data" --no-children --sort dso,sym --percent-limit 1.5 --stdio \
        -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -40 >&2 || true
    fi
  done
  stop_point
  sed -n 's/^nbdcsi-node-sim: served/simulator served/p' "$P/sim.log" >&2
done

cores=$(nproc)
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $cores cores, load average $LOAD0 at the start and $(cut -d' ' -f1-3 /proc/loadavg) at the end, \`bench/catalogue_bench.sh\` (BENCH_NODES=\"$NODES\" BENCH_COUNT=$COUNT, heartbeats every $HB_MS ms, leases of $LEASE_TTL s, etcd data on $(df -T "$ED" | awk 'NR == 2 {print $2}'))"
echo
echo "| nodes | path | CreateVolume p50 ms | p99 ms | max ms | DeleteVolume p50 ms | p99 ms | errors | etcd KV calls / mean server ms | etcd WAL fsyncs / mean ms | CPU s controller/etcd/sim | controller RSS MiB after (peak) | threads |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for n in $NODES; do
  read -r rr rh rt <<<"${MEM[$n,reg]}"
  echo "| $n | registered (idle: CPU s per s) | | | | | | | | | ${IDLE[$n]} | $rr ($rh) | $rt |"
  for path in $PATHS; do
    read -r cp50 cp99 cmax dp50 dp99 errs cpu kv fsyncs <<<"${RES[$n,$path]}"
    read -r mr mh mt <<<"${MEM[$n,$path]}"
    case $path in
      catalogue) label="catalogue (replicas=2)" ;;
      again) label="catalogue again (channels to the nodes already open)" ;;
      *) label="fan-out (1 replica)" ;;
    esac
    echo "| $n | $label | $cp50 | $cp99 | $cmax | $dp50 | $dp99 | $errs | $kv | $fsyncs | $cpu | $mr ($mh) | $mt |"
  done
done
echo
for n in $NODES; do
  [ -n "${RES[$n,catalogue]:-}" ] && [ -n "${RES[$n,fanout]:-}" ] || continue
  read -r _ cat99 _ <<<"${RES[$n,catalogue]}"
  read -r _ fan99 _ <<<"${RES[$n,fanout]}"
  awk -v n="$n" -v c="$cat99" -v f="$fan99" \
    'BEGIN { printf "%s nodes: fan-out p99 / catalogue p99 = %.1fx\n", n, (c > 0 ? f / c : 0) }'
done
[ -n "${RES[$max_nodes,catalogue]:-}" ] || exit $rc
read -r _ top99 _ <<<"${RES[$max_nodes,catalogue]}"
awk -v n="$max_nodes" -v p="$top99" 'BEGIN {
  printf "goal (issue 16): catalogue CreateVolume p99 < 20 ms at %s nodes: %.2f ms, %s\n", n, p,
         (p < 20 ? "met" : "NOT met") }'
exit $rc
