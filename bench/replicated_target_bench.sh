#!/usr/bin/env bash
# The replicated target (issue 16) against the 1-replica local path, side by side in one run, all
# on loopback: an etcd on 127.0.0.15, replica nodes node-a/b/c (nbd-datapathd, each with its own
# pool and a TLS NBD listener on 127.0.0.11/.12/.13, registered in etcd by themselves) and a
# target node node-t (127.0.0.14) that claims the volume with `nbdctl target open` and serves it
# as VOLUME@target on its Unix socket, fanning every write to the replicas over mutual TLS.
#
#   1. fio (nbd engine, libnbd) 4k randwrite at QD32 and QD1 on: the pool volume served by
#      node-a itself on its Unix socket (the 1-replica local path, the reference), the target
#      with 1, 2 and 3 replicas, and two peers on Unix sockets: qemu-nbd with O_DIRECT
#      (--cache=none --aio=io_uring, like the pool) and nbdkit's file plugin (page cache). IOPS,
#      mean and p99 completion latency, ratios to the local path, and issue 16's goals: 2
#      replicas reach >= 70 % of the local IOPS at QD32 and add <= 50 us at QD1.
#   2. The stall when a replica dies: fio QD1 randwrite with a per-I/O latency log on a
#      2-replica target, node-b killed with SIGKILL in the middle; the longest write after the
#      kill (goal < 2 s) and fio's error count (must be 0).
#
# Prints Markdown tables. Not a CTest test; no assertion on speed (a fio error or a setup failure
# does fail it). Every volume is fresh and thin, of the same size, so each point pays the same
# allocations.
#
#   bench/replicated_target_bench.sh
#   BENCH_SECONDS=8 (per fio point)  BENCH_STALL_SECONDS=12  BENCH_SIZE=64Mi
#   BENCH_DIR=/var/tmp  NBDCSI_BIN=build/bin  BENCH_PERF=1 or =node-a (perf record -g on node-t, or
#   that node, during the 2-replica QD32 point, which it slows down; the summary goes to stderr)
. "$(dirname "$0")/../test/integration/lib.sh"
need fio nbdkit qemu-nbd openssl etcd jq
fio --enghelp 2>/dev/null | grep -qw nbd || skip "needs fio with its nbd engine"
SECS=${BENCH_SECONDS:-8}
STALL_SECS=${BENCH_STALL_SECONDS:-12}
SIZE=${BENCH_SIZE:-64Mi}
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
TOOL=$NBDCSI_BIN/nbdcsi-cluster-tool
[ -x "$TOOL" ] || die "no $TOOL (build the nbdcsi-cluster-tool target)"
lib_init

free_port_on() {  # free_port_on IP
  "$PY" -c "import socket; s = socket.socket(); s.bind(('$1', 0)); print(s.getsockname()[1])"
}
can_connect() {  # can_connect IP PORT
  "$PY" -c "import socket; socket.create_connection(('$1', $2), 1)"
}

step "certificates for node-a node-b node-c node-t"
CERTS=$W/certs
bash "$NBDCSI_SRC/test/tls/make-certs.sh" "$CERTS" node-a node-b node-c node-t \
  >"$W/make-certs.log" 2>&1 || { cat "$W/make-certs.log" >&2; die "make-certs.sh failed"; }

step "etcd on 127.0.0.15"
E_IP=127.0.0.15
E_PORT=$(free_port_on $E_IP)
E_PEER=$(free_port_on $E_IP)
ETCD=$E_IP:$E_PORT
bg etcd --name=bench --data-dir="$W/etcd" --listen-client-urls="http://$ETCD" \
  --advertise-client-urls="http://$ETCD" --listen-peer-urls="http://$E_IP:$E_PEER" \
  --initial-advertise-peer-urls="http://$E_IP:$E_PEER" --initial-cluster="bench=http://$E_IP:$E_PEER" \
  --initial-cluster-state=new --logger=zap --log-level=warn --log-outputs="$W/etcd.log" 2>>"$W/etcd.stderr"
wait_for 30 etcdctl --endpoints="$ETCD" get /ready || die "etcd did not start (see $W/etcd.log)"

declare -A NODE_IP=([node-a]=127.0.0.11 [node-b]=127.0.0.12 [node-c]=127.0.0.13 [node-t]=127.0.0.14)
declare -A NODE_PID NODE_PORT
node_start() {  # node_start ID: its datapathd in $W/ID, joined to the cluster
  local id=$1 ip=${NODE_IP[$1]} d=$W/$1
  mkdir -p "$d/pool"
  NODE_PORT[$id]=$(free_port_on "$ip")
  bg "$NBDCSI_BIN/nbd-datapathd" --pool "$d/pool" --api "unix://$d/api.sock" \
    --nbd-listen "tcp://$ip:${NODE_PORT[$id]}" --nbd-listen "unix://$d/nbd.sock" \
    --nbd-tls-cert "$CERTS/node-$id.crt" --nbd-tls-key "$CERTS/node-$id.key" \
    --nbd-tls-ca "$CERTS/ca.crt" --node-id "$id" --cluster-etcd "$ETCD" --cluster-etcd-insecure \
    --cluster-lease-ttl 4 --log-level warn >>"$d/datapathd.log" 2>&1
  NODE_PID[$id]=$BG_PID
}
node_ready() {
  local id=$1 d=$W/$1
  [ -S "$d/api.sock" ] && [ -S "$d/nbd.sock" ] && can_connect "${NODE_IP[$id]}" "${NODE_PORT[$id]}"
}
on() {  # on ID nbdctl-args...
  local id=$1; shift
  "$NBDCSI_BIN/nbdctl" --api "unix://$W/$id/api.sock" "$@"
}

step "nbd-datapathd node-a node-b node-c (replicas) and node-t (target)"
for n in node-a node-b node-c node-t; do node_start $n; done
for n in node-a node-b node-c node-t; do
  wait_for 20 node_ready $n || { tail -20 "$W/$n/datapathd.log" >&2; die "$n did not start"; }
  # Registered with its TLS endpoint: the target finds the replicas there.
  wait_for 10 sh -c "etcdctl --endpoints=$ETCD get --prefix /nbd-csi/nodes/$n | grep -q ." ||
    die "$n did not register in etcd"
done

# replicated VOLUME NODE...: a pool volume on each NODE and the cluster state naming them.
replicated() {
  local v=$1 n; shift
  for n in "$@"; do on "$n" volume create "$v" --size "$SIZE" >/dev/null || die "volume $v on $n"; done
  "$TOOL" --etcd "$ETCD" create-volume "$v" "$SIZE" "$@" >"$W/$v.state" || die "cluster state of $v"
}
replicated rv1 node-a
replicated rv2 node-a node-b
replicated rv3 node-a node-b node-c
replicated rvs node-a node-b
on node-a volume create local --size "$SIZE" >/dev/null || die "volume local on node-a"
for v in rv1 rv2 rv3 rvs; do
  on node-t target open "$v" -o json >"$W/$v.open" || die "target open $v on node-t"
  [ "$(jq -r .health "$W/$v.open")" = ok ] || die "target $v not healthy: $(cat "$W/$v.open")"
done
truncate -s "$(to_bytes "$SIZE")" "$W/nbdkit.raw" "$W/qemu.raw"
bg nbdkit -f -U "$W/nbdkit.sock" file "$W/nbdkit.raw" 2>>"$W/nbdkit.log"
bg qemu-nbd --socket="$W/qemu.sock" --format=raw --cache=none --aio=io_uring --persistent \
  --shared=8 "$W/qemu.raw" 2>>"$W/qemu.log"
wait_for 10 test -S "$W/nbdkit.sock" || die "nbdkit did not start"
wait_for 10 test -S "$W/qemu.sock" || die "qemu-nbd did not start"

declare -A URI=(
  [local]="nbd+unix:///local?socket=$W/node-a/nbd.sock"
  [r1]="nbd+unix:///rv1@target?socket=$W/node-t/nbd.sock"
  [r2]="nbd+unix:///rv2@target?socket=$W/node-t/nbd.sock"
  [r3]="nbd+unix:///rv3@target?socket=$W/node-t/nbd.sock"
  [qemu]="nbd+unix:///?socket=$W/qemu.sock"
  [nbdkit]="nbd+unix:///?socket=$W/nbdkit.sock"
)
declare -A LABEL=(
  [local]="1 replica, local pool volume (node-a's Unix socket)"
  [r1]="target, 1 replica (node-t -> node-a, TLS)"
  [r2]="target, 2 replicas"
  [r3]="target, 3 replicas"
  [qemu]="qemu-nbd O_DIRECT (Unix socket, peer)"
  [nbdkit]="nbdkit file plugin, page cache (Unix socket, peer)"
)
ORDER=(local r1 r2 r3 qemu nbdkit)

# fio_run NAME URI QD SECONDS [extra fio args...]: JSON in $W/NAME.json; dies on a fio error.
fio_run() {
  local name=$1 uri=$2 qd=$3 secs=$4; shift 4
  fio --name="$name" --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth="$qd" \
    --size="$(to_bytes "$SIZE")" --time_based --runtime="$secs" --ramp_time=1 \
    --output-format=json --output="$W/$name.json" "$@" >"$W/$name.log" 2>&1 ||
    { cat "$W/$name.log" >&2; die "fio $name failed"; }
  [ "$(jq '.jobs[0].error' "$W/$name.json")" = 0 ] || die "fio $name reported an error"
}
# iops / mean us / p99 us of a fio JSON (completion latency: for the async nbd engine it is the
# whole time a write spends in flight).
fio_fields() {
  jq -r '.jobs[0].write | "\(.iops) \(.clat_ns.mean / 1000) \(.clat_ns.percentile["99.000000"] / 1000)"' \
    "$W/$1.json"
}

# CPU time (user + system, clock ticks) of a node's daemon so far.
ticks() { awk '{ print $14 + $15 }' "/proc/${NODE_PID[$1]}/stat"; }
# Which daemons serve each path: the one the client talks to, then the replicas behind it.
declare -A FRONT=([local]=node-a [r1]=node-t [r2]=node-t [r3]=node-t)
declare -A BACK=([r1]="node-a" [r2]="node-a node-b" [r3]="node-a node-b node-c")
HZ=$(getconf CLK_TCK)

declare -A IOPS32 LAT32 P9932 IOPS1 LAT1 P991 CPU_FRONT CPU_BACK
for t in "${ORDER[@]}"; do
  step "$t: 4k randwrite QD32 then QD1, ${SECS}s each"
  if [ "$t" = r2 ] && [ "${BENCH_PERF:-0}" != 0 ]; then
    perf_node=$BENCH_PERF
    [ "$perf_node" = 1 ] && perf_node=node-t
    [ -n "${NODE_PID[$perf_node]:-}" ] || die "BENCH_PERF=$BENCH_PERF: not a node"
    perf record -g -o "$W/perf.data" -p "${NODE_PID[$perf_node]}" -- sleep "$SECS" \
      >"$W/perf.log" 2>&1 &
    perf_pid=$!
  fi
  front=${FRONT[$t]:-} f0=0 b0=0
  [ -n "$front" ] && f0=$(ticks "$front")
  for n in ${BACK[$t]:-}; do b0=$((b0 + $(ticks "$n"))); done
  fio_run "$t-qd32" "${URI[$t]}" 32 "$SECS"
  f1=0 b1=0
  [ -n "$front" ] && f1=$(ticks "$front")
  for n in ${BACK[$t]:-}; do b1=$((b1 + $(ticks "$n"))); done
  # Per write, over the whole run (ramp included): CPU us = ticks / HZ * 1e6 / writes.
  ios=$(jq '.jobs[0].write.total_ios' "$W/$t-qd32.json")
  CPU_FRONT[$t]=-; CPU_BACK[$t]=-
  [ -n "$front" ] && CPU_FRONT[$t]=$(awk -v d=$((f1 - f0)) -v h="$HZ" -v n="$ios" 'BEGIN { printf "%.0f", d / h * 1e6 / n }')
  [ -n "${BACK[$t]:-}" ] && CPU_BACK[$t]=$(awk -v d=$((b1 - b0)) -v h="$HZ" -v n="$ios" 'BEGIN { printf "%.0f", d / h * 1e6 / n }')
  if [ -n "${perf_pid:-}" ]; then
    wait "$perf_pid" || true
    echo "  perf record on $perf_node, 2 replicas, QD32 (top 30 by self time):" >&2
    { perf report -i "$W/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
        grep -E '^ +[0-9]' | head -30 | cut -c1-110 >&2; } || true
    perf_pid=
  fi
  fio_run "$t-qd1" "${URI[$t]}" 1 "$SECS"
  read -r IOPS32[$t] LAT32[$t] P9932[$t] < <(fio_fields "$t-qd32")
  read -r IOPS1[$t] LAT1[$t] P991[$t] < <(fio_fields "$t-qd1")
  printf '  QD32 %.0f IOPS mean %.0f us p99 %.0f us; QD1 %.0f IOPS mean %.1f us p99 %.1f us\n' \
    "${IOPS32[$t]}" "${LAT32[$t]}" "${P9932[$t]}" "${IOPS1[$t]}" "${LAT1[$t]}" "${P991[$t]}" >&2
done

step "stall: QD1 randwrite on a 2-replica target (rvs), node-b killed with SIGKILL mid-run"
fio --name=stall --ioengine=nbd --uri="nbd+unix:///rvs@target?socket=$W/node-t/nbd.sock" \
  --rw=randwrite --bs=4k --iodepth=1 --size="$(to_bytes "$SIZE")" --time_based \
  --runtime="$STALL_SECS" --write_lat_log="$W/stall" --log_avg_msec=0 --log_unix_epoch=1 \
  --output-format=json --output="$W/stall.json" >"$W/stall.log" 2>&1 &
fio_pid=$!
LIB_PIDS+=("$fio_pid")
sleep "$(awk -v s="$STALL_SECS" 'BEGIN { print s / 2 }')"
kill -0 "$fio_pid" 2>/dev/null || { cat "$W/stall.log" >&2; die "fio ended before the kill"; }
kill_ms=$(date +%s%3N)
kill -KILL "${NODE_PID[node-b]}"
fio_rc=0
wait "$fio_pid" || fio_rc=$?
[ -s "$W/stall.json" ] || { cat "$W/stall.log" >&2; die "fio wrote no report"; }
STALL_ERR=$(jq '.jobs[0].error' "$W/stall.json")
STALL_TOTAL_ERR=$(jq '.jobs[0].total_err // 0' "$W/stall.json")
STALL_IOS=$(jq '.jobs[0].write.total_ios' "$W/stall.json")
on node-t target inspect rvs -o json >"$W/rvs.inspect" || die "target inspect rvs"
STALL_HEALTH=$(jq -r .health "$W/rvs.inspect")
STALL_INSYNC=$(jq -c .in_sync "$W/rvs.inspect")
# The latency log's time column is each write's completion, in Unix ms (log_unix_epoch): the
# writes completed after the kill include the one in flight when node-b died.
log=$(ls "$W"/stall_lat.*.log 2>/dev/null | head -1)
[ -n "$log" ] || die "fio wrote no latency log"
read -r STALL_BEFORE STALL_AFTER STALL_AFTER_AT < <(awk -F', *' -v k="$kill_ms" '
  $1 < k { if ($2 > before) before = $2 }
  $1 >= k { if ($2 > after) { after = $2; at = $1 } }
  END { printf "%.3f %.3f %d\n", before / 1e6, after / 1e6, at - k }' "$log")
echo "  the 5 longest writes after the kill (ms after the kill: latency ms):" \
  "$(awk -F', *' -v k="$kill_ms" '$1 >= k { printf "%d: %.1f\n", $1 - k, $2 / 1e6 }' "$log" |
     sort -t: -k2 -rn | head -5 | paste -sd' ')" >&2
echo "  fio rc $fio_rc, error $STALL_ERR, $STALL_IOS writes; longest before the kill" \
  "$STALL_BEFORE ms, after $STALL_AFTER ms (completed ${STALL_AFTER_AT} ms after the kill);" \
  "target $STALL_HEALTH, in_sync $STALL_INSYNC" >&2

for v in rv1 rv2 rv3 rvs; do on node-t target close "$v" >/dev/null || die "target close $v"; done

echo
echo "4k randwrite, fio $(fio --version | sed 's/fio-//') nbd engine (libnbd), ${SECS}s per point, $(nproc) cores, volumes of $SIZE"
echo
echo "| path | QD32 IOPS | QD32 mean us | QD32 p99 us | QD32 IOPS / local | QD1 IOPS | QD1 mean us | QD1 p99 us | QD1 mean - local us | QD32 CPU us/write: served by | replicas |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for t in "${ORDER[@]}"; do
  awk -v l="${LABEL[$t]}" -v i="${IOPS32[$t]}" -v m="${LAT32[$t]}" -v p="${P9932[$t]}" \
    -v i1="${IOPS1[$t]}" -v m1="${LAT1[$t]}" -v p1="${P991[$t]}" \
    -v ri="${IOPS32[local]}" -v rm1="${LAT1[local]}" -v cf="${CPU_FRONT[$t]}" -v cb="${CPU_BACK[$t]}" \
    'BEGIN { printf "| %s | %.0f | %.0f | %.0f | %.2f | %.0f | %.1f | %.1f | %+.1f | %s | %s |\n",
             l, i, m, p, i / ri, i1, m1, p1, m1 - rm1, cf, cb }'
done
echo
awk -v i2="${IOPS32[r2]}" -v ri="${IOPS32[local]}" -v m2="${LAT1[r2]}" -v rm="${LAT1[local]}" \
  -v sa="$STALL_AFTER" -v se="$STALL_ERR" -v st="$STALL_TOTAL_ERR" 'BEGIN {
  printf "| goal (issue 16) | measured | met |\n|---|---|---|\n"
  printf "| 2 replicas >= 70%% of the 1-replica IOPS (QD32) | %.0f%% | %s |\n",
         100 * i2 / ri, (i2 >= 0.7 * ri) ? "yes" : "NO"
  printf "| 2 replicas add <= 50 us at QD1 (mean) | %+.1f us | %s |\n",
         m2 - rm, (m2 - rm <= 50) ? "yes" : "NO"
  printf "| stall when a replica dies (SIGKILL) < 2 s | %.1f ms longest write after the kill | %s |\n",
         sa, (sa < 2000) ? "yes" : "NO"
  printf "| no write fails when a replica dies | fio error %s, %s I/O errors | %s |\n",
         se, st, (se == 0 && st == 0) ? "yes" : "NO"
}'
echo "stall run: $STALL_IOS writes at QD1 over ${STALL_SECS}s, longest before the kill $STALL_BEFORE ms; after: target $STALL_HEALTH, in_sync $STALL_INSYNC"
[ "$fio_rc" = 0 ] && [ "$STALL_ERR" = 0 ] || die "fio failed when node-b died (rc $fio_rc, error $STALL_ERR)"
