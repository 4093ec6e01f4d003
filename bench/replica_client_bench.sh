#!/usr/bin/env bash
# The replica client (datapath/replica) as the fan-out target will use it: 4 KiB random writes
# over NBD with mutual TLS on loopback TCP, at QD1 (latency) and QD32 (IOPS), against
# nbd-datapathd's TLS listener and, as peers on the same disk, qemu-nbd and nbdkit (file plugin)
# with the same certificates, plus nbdkit's memory plugin (the transport ceiling: no disk).
# Prints a Markdown table with ratios to nbd-datapathd. Not a CTest test; no assertion on speed.
#
#   bench/replica_client_bench.sh        BENCH_SECONDS=5 BENCH_DIR=/var/tmp NBDCSI_BIN=build/bin
. "$(dirname "$0")/../test/integration/lib.sh"
. "$(dirname "$0")/../test/integration/nbd_tls_lib.sh"
need qemu-nbd nbdkit openssl
SECONDS_EACH=${BENCH_SECONDS:-5}
NBDCSI_SERVER=datapathd
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
BENCH=$NBDCSI_BIN/replica_client_bench
[ -x "$BENCH" ] || die "no $BENCH (build the replica_client_bench target)"
lib_init
tls_certs
srv=$W/srv
mkdir -p "$srv"
cp "$CERTS/ca.crt" "$srv/ca-cert.pem"
cp "$CERTS/server.crt" "$srv/server-cert.pem"
(umask 077 && cp "$CERTS/server.key" "$srv/server-key.pem")

step "nbd-datapathd with its TLS listener, a 1 GiB volume"
tls_daemon_start
DP_PORT=$PORT
vol_create bench 1Gi

step "peers with the same certificates: qemu-nbd and nbdkit on 1 GiB files, nbdkit memory"
truncate -s 1G "$W/qemu.raw" "$W/kfile.raw"
Q_PORT=$(free_port)
bg qemu-nbd --format=raw --aio=io_uring -x bench --persistent --shared=8 \
  --object "tls-creds-x509,id=tls0,dir=$srv,endpoint=server,verify-peer=on" --tls-creds=tls0 \
  --bind=127.0.0.1 --port="$Q_PORT" "$W/qemu.raw" 2>>"$W/qemu.log"
KF_PORT=$(free_port)
bg nbdkit -f -i 127.0.0.1 -p "$KF_PORT" --tls=require --tls-certificates="$srv" --tls-verify-peer \
  file "$W/kfile.raw" 2>>"$W/kfile.log"
KM_PORT=$(free_port)
bg nbdkit -f -i 127.0.0.1 -p "$KM_PORT" --tls=require --tls-certificates="$srv" --tls-verify-peer \
  memory 1G 2>>"$W/kmem.log"
for p in "$Q_PORT" "$KF_PORT" "$KM_PORT"; do
  wait_for 10 "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $p), 1)" ||
    die "a peer did not listen on $p"
done

run() {  # run PORT QD CONNECTIONS -> the bench line
  "$BENCH" "tcp://127.0.0.1:$1" bench "$2" "$SECONDS_EACH" "$3" "$CERTS/client.crt" \
    "$CERTS/client.key" "$CERTS/ca.crt" || die "bench against port $1 failed"
}
field() { sed -E "s/.*$1=([0-9.]+).*/\1/" <<<"$2"; }

declare -A LAT P99 IOPS
for t in datapathd qemu-nbd nbdkit-file nbdkit-memory; do
  case $t in
    datapathd) port=$DP_PORT ;; qemu-nbd) port=$Q_PORT ;;
    nbdkit-file) port=$KF_PORT ;; nbdkit-memory) port=$KM_PORT ;;
  esac
  step "$t: QD1 (1 connection), QD32 (4 connections), ${SECONDS_EACH}s each"
  one=$(run "$port" 1 1)
  many=$(run "$port" 32 4)
  echo "  qd1:  $one" >&2
  echo "  qd32: $many" >&2
  LAT[$t]=$(field lat_avg_us "$one")
  P99[$t]=$(field lat_p99_us "$one")
  IOPS[$t]=$(field iops "$many")
done

echo
echo "| peer over TLS (4k randwrite) | QD1 avg us | QD1 p99 us | QD1 latency / datapathd | QD32 IOPS | QD32 IOPS / datapathd |"
echo "|---|---|---|---|---|---|"
for t in datapathd qemu-nbd nbdkit-file nbdkit-memory; do
  awk -v t="$t" -v l="${LAT[$t]}" -v p="${P99[$t]}" -v i="${IOPS[$t]}" \
    -v dl="${LAT[datapathd]}" -v di="${IOPS[datapathd]}" \
    'BEGIN { printf "| %s | %.0f | %.0f | %.2f | %.0f | %.2f |\n", t, l, p, l / dl, i, i / di }'
done
daemon_stop
