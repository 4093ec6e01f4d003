#!/usr/bin/env bash
# Rebuild throughput of issue 16's resync (datapath/replica/resync.h) against the disk's own
# sequential write speed. Two nbd-datapathd on this machine, each with its own pool on the same
# disk: the source read over its Unix socket, the destination written over mutual TLS on
# 127.0.0.1, as between two nodes. Cases: a full rebuild of a fully written volume (every byte
# copied) and a full rebuild of a sparse volume (holes skipped by BLOCK_STATUS); the dirty-region
# path is the same copy loop on fewer bytes. The baseline is dd of the same size with O_DIRECT and a final fsync into
# the same directory. Prints a Markdown table. Not a CTest test; no assertion on speed (the goal
# of issue 16 is a rebuild at 70 % of the disk's sequential write speed).
#
#   bench/resync_bench.sh        BENCH_SIZE_MIB=1024 BENCH_DIR=/var/tmp NBDCSI_BIN=build/bin
#                                BENCH_CLI_ARGS="--in-flight 16 --chunk 4194304" (resync_cli options)
. "$(dirname "$0")/../test/integration/lib.sh"
. "$(dirname "$0")/../test/integration/nbd_tls_lib.sh"
need nbdcopy qemu-io openssl
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
NBDCSI_SERVER=datapathd
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
CLI=$NBDCSI_BIN/resync_cli
[ -x "$CLI" ] || die "no $CLI (build the resync_cli target)"
lib_init
tls_certs

step "source: nbd-datapathd on a Unix socket; destination: a second one with a TLS listener"
daemon_start "$W/pool-a"
B=$W/b
mkdir -p "$B/pool"
B_PORT=$(free_port)
bg "$NBDCSI_BIN/nbd-datapathd" --pool "$B/pool" --api "unix://$B/api.sock" \
  --nbd-listen "unix://$B/nbd.sock" --nbd-listen "tcp://127.0.0.1:$B_PORT" \
  --nbd-tls-cert "$CERTS/server.crt" --nbd-tls-key "$CERTS/server.key" \
  --nbd-tls-ca "$CERTS/ca.crt" >>"$B/datapathd.log" 2>&1
wait_for 15 test -S "$B/api.sock" || die "the second nbd-datapathd did not start"
nbdctl_b() { "$NBDCSI_BIN/nbdctl" --api "unix://$B/api.sock" "$@"; }

rebuild() {  # rebuild NAME [resync_cli options] -> the JSON line
  "$CLI" "unix://$NBD_SOCK" "$1" "tcp://127.0.0.1:$B_PORT" "$1" \
    --tls "$CERTS/client.crt" "$CERTS/client.key" "$CERTS/ca.crt" ${BENCH_CLI_ARGS:-} "${@:2}" \
    2>>"$W/cli.log" ||
    { tail -5 "$W/cli.log" >&2; die "resync_cli $1 failed"; }
}
field() { sed -E "s/.*\"$1\":([0-9.]+).*/\1/" <<<"$2"; }

step "baseline: dd ${SIZE_MIB} MiB, O_DIRECT, fsync, into the pools' directory"
t0=$(date +%s.%N)
dd if=/dev/zero of="$W/seq.bin" bs=1M count="$SIZE_MIB" oflag=direct conv=fsync status=none
DISK=$(awk -v a="$t0" -v b="$(date +%s.%N)" -v m="$SIZE_MIB" 'BEGIN { printf "%.1f", m / (b - a) }')
rm -f "$W/seq.bin"
echo "  $DISK MiB/s" >&2

step "full: a ${SIZE_MIB} MiB volume written end to end, rebuilt onto a fresh one"
vol_create full "${SIZE_MIB}Mi"
nbdctl_b volume create full --size "${SIZE_MIB}Mi" >/dev/null
random_file "$W/full.src" $((SIZE_MIB << 20))
nbdcopy "$W/full.src" "$(nbd_uri full)"
rm -f "$W/full.src"
FULL=$(rebuild full)
echo "  $FULL" >&2

step "sparse: the same size with 64 MiB of data in 16 places"
vol_create sparse "${SIZE_MIB}Mi"
nbdctl_b volume create sparse --size "${SIZE_MIB}Mi" >/dev/null
cmds=()
for i in $(seq 0 15); do cmds+=(-c "write -P $((i + 1)) $((i * SIZE_MIB / 16))M 4M"); done
qemu-io -f raw "${cmds[@]}" -c flush "$(nbd_uri sparse)" >"$W/qemu-io.log" 2>&1 ||
  { cat "$W/qemu-io.log" >&2; die "writing the sparse volume failed"; }
SPARSE=$(rebuild sparse)
echo "  $SPARSE" >&2

echo
echo "| case (${SIZE_MIB} MiB volume, TLS destination) | copied MiB | skipped MiB | seconds | copy MiB/s | / disk sequential write ($DISK MiB/s) |"
echo "|---|---|---|---|---|---|"
for c in full sparse; do
  j=${FULL}; [ $c = sparse ] && j=$SPARSE
  awk -v c="$c" -v cp="$(field copied "$j")" -v sk="$(field skipped "$j")" \
    -v s="$(field seconds "$j")" -v r="$(field copied_mib_per_s "$j")" -v d="$DISK" \
    'BEGIN { printf "| %s | %.0f | %.0f | %.2f | %.1f | %.2f |\n", c, cp / 1048576, sk / 1048576, s, r, r / d }'
done
daemon_stop
