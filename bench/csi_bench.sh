#!/usr/bin/env bash
# CSI Controller cost: nbd-csi-controller and two nbd-datapathd "nodes" (pools on tmpfs, or
# BENCH_DIR), joined over loopback (plaintext, or mutual TLS with TLS=1), driven by csi_bench:
# COUNT CreateVolume calls, then one CreateSnapshot per volume, then the deletes; p50/p90/p99,
# throughput, and the p99 of the first vs the last 100 calls of each phase. Not a CTest test.
# Targets (issue 4): p99 < 50 ms, and no degradation across 1,000 volumes.
#   bench/csi_bench.sh       COUNT=1000 PARALLEL="1 4" SIZE=67108864 TLS=0
#                            BENCH_DIR=/dev/shm NBDCSI_BIN=build/bin
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/.." && pwd)
BIN=${NBDCSI_BIN:-$SRC/build/bin}
COUNT=${COUNT:-1000}
PARALLEL=${PARALLEL:-"1 4"}
SIZE=${SIZE:-67108864}
TLS=${TLS:-0}
BASE=${BENCH_DIR:-/dev/shm}
for b in nbd-csi-controller nbd-datapathd csi_bench; do
  [[ -x $BIN/$b ]] || { echo "csi_bench.sh: $BIN/$b not built (ninja $b)" >&2; exit 1; }
done

W=$(mktemp -d "$BASE/nbdcsi-csibench-XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ -n ${NBDCSI_KEEP:-} ]]; then echo "kept $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REG=$(free_port)
if [[ $TLS == 1 ]]; then
  bash "$SRC/test/tls/make-certs.sh" "$W/tls" node-a node-b >/dev/null
  SEC=(--tls-cert "$W/tls/server.crt" --tls-key "$W/tls/server.key" --tls-ca "$W/tls/ca.crt")
else
  SEC=(--insecure)
fi
# Each datapath presents its own node certificate (what the controller binds the node id to).
node_sec() {
  if [[ $TLS == 1 ]]; then
    echo --tls-cert "$W/tls/node-$1.crt" --tls-key "$W/tls/node-$1.key" --tls-ca "$W/tls/ca.crt"
  else
    echo --insecure
  fi
}

"$BIN/nbd-csi-controller" --csi-endpoint "unix://$W/csi.sock" --registry-listen "127.0.0.1:$REG" \
  --heartbeat-interval 500 --log-level info "${SEC[@]}" >"$W/controller.log" 2>&1 &
PIDS+=($!)
for n in node-a node-b; do
  mkdir -p "$W/pool-$n"
  "$BIN/nbd-datapathd" --pool "$W/pool-$n" --api "unix://$W/$n-api.sock" \
    --nbd-listen "unix://$W/$n-nbd.sock" --workers 1 --capacity 100Ti \
    --node-id "$n" --advertise "127.0.0.1:$(free_port)" --controller "127.0.0.1:$REG" \
    --heartbeat-interval 500 --log-level warn $(node_sec "$n") >"$W/$n.log" 2>&1 &
  PIDS+=($!)
done
# Both nodes registered: wait until the controller places a probe volume on each.
for i in $(seq 100); do
  [[ -S $W/csi.sock && -S $W/node-a-api.sock && -S $W/node-b-api.sock ]] && \
    grep -q "node-b registered" "$W/controller.log" 2>/dev/null && \
    grep -q "node-a registered" "$W/controller.log" 2>/dev/null && break
  sleep 0.1
done
sleep 1  # one more heartbeat so both report their room

echo "csi_bench: $(nproc) cores, pools on $(df -T "$W" | awk 'NR==2 {print $2}') ($BASE), TLS=$TLS"
rc=0
for p in $PARALLEL; do
  echo
  "$BIN/csi_bench" --endpoint "unix://$W/csi.sock" --count "$COUNT" --parallel "$p" \
    --size "$SIZE" || rc=1
done
# CPU (user + system) each process used for the whole run, from /proc/PID/stat.
hz=$(getconf CLK_TCK)
names=(nbd-csi-controller nbd-datapathd:node-a nbd-datapathd:node-b)
echo
for i in "${!PIDS[@]}"; do
  awk -v n="${names[$i]}" -v hz="$hz" '{ printf "CPU %s: %.2f s\n", n, ($14 + $15) / hz }' \
    "/proc/${PIDS[$i]}/stat"
done
exit $rc
