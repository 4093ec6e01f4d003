#!/usr/bin/env bash
# Backup and restore throughput to a local S3 server (s3rver on the loopback, as in
# test/integration/backup_s3.sh): a 1 GiB volume with 300 MiB of random data written over NBD,
# full backup, 10 MiB changed, incremental backup (bytes counted on the server), restores of
# both, the full backup and its restore again into an encrypted target (client-side AES-256-GCM),
# and `aws s3 cp` of the same 300 MiB as a file to the same server for comparison (when the aws
# CLI is installed). Prints one table; nothing is asserted.
#   bench/backup_bench.sh          (NBDCSI_BIN: built binaries, default build/bin)
set -euo pipefail
NBDCSI_SRC=${NBDCSI_SRC:-$(cd "$(dirname "$0")/.." && pwd)}
NBDCSI_BIN=${NBDCSI_BIN:-$NBDCSI_SRC/build/bin}
export NBDCSI_SRC NBDCSI_BIN
. "$NBDCSI_SRC/test/integration/lib.sh"
NBDCSI_SERVER=datapathd
PY=/usr/bin/python3
S3RVER_BIN=$("$NBDCSI_SRC/scripts/get-s3rver.sh") || skip "no s3rver"
need nbdcopy sha256sum jq
lib_init

MiB=$((1 << 20))
BUCKET=bench
export AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER
port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ENDPOINT=http://127.0.0.1:$port
mkdir -p "$W/s3"
# s3rver makes its listing continuation tokens with a cipher OpenSSL 3 keeps in its legacy
# provider; without it a listing of more than 1000 keys fails with HTTP 500.
bg env NODE_OPTIONS=--openssl-legacy-provider "$S3RVER_BIN" -d "$W/s3" -a 127.0.0.1 -p "$port" -s --configure-bucket "$BUCKET" >/dev/null
wait_for 30 $PY -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" ||
  die "s3rver did not start"
T=(--target "s3://$BUCKET/vol" --endpoint "$ENDPOINT")
now() { date +%s.%N; }
rate() { awk -v b="$1" -v a="$2" -v c="$3" 'BEGIN { printf "%.1f", b / (c - a) / 1048576 }'; }
secs() { awk -v a="$1" -v c="$2" 'BEGIN { printf "%.2f", c - a }'; }
stored() {
  find "$W/s3/$BUCKET/vol/chunks" -name '*._S3rver_object' -printf '%s\n' | awk '{ b += $1 } END { print b + 0 }'
}

daemon_start
nbdctl volume create v --size 1Gi >/dev/null
# 300 MiB of random data in 30 regions of 10 MiB spread over the 1 GiB.
truncate -s 1G "$W/image"
random_file "$W/region" $((10 * MiB))
for i in $(seq 0 29); do
  dd if="$W/region" of="$W/image" bs=1M seek=$((i * 34)) conv=notrunc status=none
  random_file "$W/region" $((10 * MiB))
done
nbdcopy "$W/image" "$(nbd_uri v)"
nbdctl snapshot create s1 --volume v --wait >/dev/null

t0=$(now); nbdctl backup create full "${T[@]}" --snapshot s1 --wait >/dev/null 2>&1; t1=$(now)
full_bytes=$(stored)
dd if=/dev/urandom of="$W/change" bs=1M count=10 status=none
nbd_pwrite v $((5 * MiB)) "$W/change"
nbdctl snapshot create s2 --volume v --wait >/dev/null
t2=$(now); nbdctl backup create inc "${T[@]}" --snapshot s2 --wait >/dev/null 2>&1; t3=$(now)
inc_bytes=$(( $(stored) - full_bytes ))
t4=$(now); nbdctl backup restore full "${T[@]}" --volume r1 --wait >/dev/null 2>&1; t5=$(now)
t6=$(now); nbdctl backup restore inc "${T[@]}" --volume r2 --wait >/dev/null 2>&1; t7=$(now)
cmp <(nbdcopy "$(nbd_uri r1)" - | sha256sum) <(sha256sum <"$DAEMON_POOL/snapshots/s1.img") >/dev/null ||
  die "restore of the full backup differs"
# The same full backup into an encrypted target (a fresh prefix: nothing to deduplicate against).
head -c 32 /dev/urandom | base64 >"$W/key"
E=(--target "s3://$BUCKET/enc" --endpoint "$ENDPOINT" --encryption-key-file "$W/key")
t10=$(now); nbdctl backup create full "${E[@]}" --snapshot s1 --wait >/dev/null 2>&1; t11=$(now)
t12=$(now); nbdctl backup restore full "${E[@]}" --volume r3 --wait >/dev/null 2>&1; t13=$(now)
cmp <(nbdcopy "$(nbd_uri r3)" - | sha256sum) <(sha256sum <"$DAEMON_POOL/snapshots/s1.img") >/dev/null ||
  die "restore of the encrypted backup differs"
aws_line="| aws s3 cp of the 300 MiB (file) | - | - | (aws CLI not installed) |"
if command -v aws >/dev/null 2>&1; then
  head -c $((300 * MiB)) /dev/urandom >"$W/flat"
  t8=$(now)
  aws --endpoint-url "$ENDPOINT" --region us-east-1 s3 cp "$W/flat" "s3://$BUCKET/aws/flat" \
    --only-show-errors
  t9=$(now)
  aws_line="| aws s3 cp of the same 300 MiB (one file, multipart) | $(secs "$t8" "$t9") | $(rate $((300 * MiB)) "$t8" "$t9") | $((300 * MiB)) |"
fi
daemon_stop

echo
echo "| step | seconds | MiB/s of data | bytes stored on the server |"
echo "|---|---|---|---|"
echo "| full backup (1 GiB volume, 300 MiB written) | $(secs "$t0" "$t1") | $(rate $((300 * MiB)) "$t0" "$t1") | $full_bytes |"
echo "| incremental backup after 10 MiB changed | $(secs "$t2" "$t3") | - | $inc_bytes |"
echo "| restore of the full backup | $(secs "$t4" "$t5") | $(rate $((300 * MiB)) "$t4" "$t5") | - |"
echo "| restore of the incremental backup | $(secs "$t6" "$t7") | $(rate $((300 * MiB)) "$t6" "$t7") | - |"
echo "| full backup into an encrypted target | $(secs "$t10" "$t11") | $(rate $((300 * MiB)) "$t10" "$t11") | - |"
echo "| restore of the encrypted backup | $(secs "$t12" "$t13") | $(rate $((300 * MiB)) "$t12" "$t13") | - |"
echo "$aws_line"
