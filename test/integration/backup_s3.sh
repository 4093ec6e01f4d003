#!/usr/bin/env bash
# Backups to a real S3 server (s3rver from the npm registry, scripts/get-s3rver.sh) on the
# loopback, through nbd-datapathd and nbdctl: data written over NBD, snapshot, full backup,
# a small change, incremental backup (the server's own object count and bytes prove that only
# the changed chunk went up), the source and its pool gone (a second daemon on a fresh pool
# stands for another cluster), both backups restored bit-exact with their holes, the first
# backup deleted with the shared chunks kept, a corrupt chunk on the server refused at restore,
# a bandwidth limit obeyed, a backup of a live volume, listings longer than one page (1005 stray
# objects collected), kill -9 of the daemon mid-backup (no backup listed, the retry works) and
# mid-restore (the half volume is removed at the restart), client-side encryption (no known
# plaintext on the server, bit-exact restore, wrong/missing/unexpected keys refused), and clear
# errors for bad credentials, a missing bucket and a dead endpoint. Exits 77 when s3rver (or node) is missing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

NBDCSI_SERVER=datapathd
PY=/usr/bin/python3
S3RVER_BIN=$("$NBDCSI_SRC/scripts/get-s3rver.sh" --check 2>/dev/null) ||
  skip "s3rver is not installed (scripts/deps.sh test installs it)"
need node jq nbdcopy sha256sum curl xargs
$PY -c 'import nbd' 2>/dev/null || skip "needs python3-libnbd"

lib_init

MiB=$((1 << 20))
CHUNK=$((4 * MiB))
BUCKET=backups
PREFIX=cluster-a/nightly
export AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER  # s3rver's built-in account
port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ENDPOINT=http://127.0.0.1:$port
mkdir -p "$W/s3"
# s3rver makes its listing continuation tokens with a cipher OpenSSL 3 keeps in its legacy
# provider; without it a listing of more than 1000 keys fails with HTTP 500.
bg env NODE_OPTIONS=--openssl-legacy-provider "$S3RVER_BIN" -d "$W/s3" -a 127.0.0.1 -p "$port" -s --configure-bucket "$BUCKET"
wait_for 30 $PY -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" ||
  die "s3rver did not listen on $port"
step "s3rver on $ENDPOINT"

T=(--target "s3://$BUCKET/$PREFIX" --endpoint "$ENDPOINT" --region us-east-1)
# What the server holds under PREFIX/chunks: "COUNT BYTES", read from its own data directory.
server_chunks() {
  find "$W/s3/$BUCKET/$PREFIX/chunks" -name '*._S3rver_object' -printf '%s\n' 2>/dev/null |
    awk '{ n++; b += $1 } END { printf "%d %d\n", n, b }'
}
vol_sha() {  # the sha256 of a volume's whole content, read over NBD
  nbdcopy "$(nbd_uri "$1")" "$W/read.$1" || die "nbdcopy from $1 failed"
  sha256sum <"$W/read.$1" | cut -d' ' -f1
  rm -f "$W/read.$1"
}
backup() {  # backup NAME SOURCE-FLAGS... : --wait, JSON job in $W/job.NAME.json
  local name=$1; shift
  nbdctl -o json backup create "$name" "${T[@]}" "$@" --wait >"$W/job.$name.json" 2>"$W/err" ||
    { cat "$W/err" >&2; die "backup $name failed"; }
}

daemon_start
# ---- data written through NBD: 256 MiB volume, 10 regions of 3 MiB (40 MiB with the one
# below), the rest never written ----
vol_create src 256Mi
for i in 0 1 2 3 4 5 6 7 8 9; do
  random_file "$W/part$i" $((3 * MiB))
  nbd_pwrite src $(( i * 6 * CHUNK )) "$W/part$i"
done
random_file "$W/tail" $((10 * MiB))
nbd_pwrite src $((200 * MiB)) "$W/tail"
nbdctl snapshot create s1 --volume src --wait >/dev/null
sha_s1=$(vol_sha src)
step "40 MiB written over NBD, snapshot s1"

# ---- full backup ----
t0=$(date +%s.%N)
backup b1 --snapshot s1
t1=$(date +%s.%N)
jq -e '.state == "succeeded" and .done_bytes == .total_bytes and .total_bytes == 268435456' \
  "$W/job.b1.json" >/dev/null || die "b1 job: $(cat "$W/job.b1.json")"
# Progress is counted in allocated data: the 13 chunks that hold data, not the 256 MiB.
jq -e --argjson c "$CHUNK" '.data_total_bytes == 13 * $c and .data_done_bytes == 13 * $c
  and .percent == 100' "$W/job.b1.json" >/dev/null || die "b1 data progress: $(cat "$W/job.b1.json")"
up1=$(jq .chunks_uploaded "$W/job.b1.json")
[ "$up1" = 13 ] || die "b1 uploaded $up1 chunks, want 13 (10 regions of one chunk, 10 MiB = 3 chunks)"
read -r n1 bytes1 <<<"$(server_chunks)"
[ "$n1" = 13 ] || die "server holds $n1 chunks after b1, want 13"
mbps=$(awk -v b=$((40 * MiB)) -v a="$t0" -v c="$t1" 'BEGIN { printf "%.1f", b / (c - a) / 1048576 }')
step "b1: 13 chunks, $bytes1 bytes stored on the server; 40 MiB of data backed up at $mbps MiB/s"

nbdctl -o json backup list "${T[@]}" >"$W/list.json"
jq -e '.backups | length == 1 and .[0].name == "b1" and .[0].chunks == 13 and
  .[0].source_snapshot == "s1" and .[0].source_volume == "src" and
  .[0].data_bytes == 54525952' "$W/list.json" >/dev/null || die "list: $(cat "$W/list.json")"
nbdctl backup list "${T[@]}" | grep -q '^b1 ' || die "table list lacks b1"

# ---- a small change: 64 KiB inside the chunk at 48 MiB; incremental backup ----
random_file "$W/change" $((64 * 1024))
nbd_pwrite src $((12 * CHUNK + 4096)) "$W/change"
nbdctl snapshot create s2 --volume src --wait >/dev/null
sha_s2=$(vol_sha src)
[ "$sha_s1" != "$sha_s2" ] || die "the change did not change the volume"
backup b2 --snapshot s2
jqx '.chunks_uploaded == 1 and .chunks_reused == 12' <"$W/job.b2.json"
read -r n2 bytes2 <<<"$(server_chunks)"
[ "$n2" = 14 ] || die "server holds $n2 chunks after b2, want 14 (one new)"
inc=$((bytes2 - bytes1))
[ "$inc" -le $((CHUNK + 4096)) ] || die "b2 added $inc bytes on the server, more than one chunk"
jqx ".transferred_bytes == $inc" <"$W/job.b2.json"
nbdctl -o json backup inspect b2 "${T[@]}" >"$W/inspect.json"
jqx ".backup.uploaded_bytes == $inc and .backup.chunks == 13" <"$W/inspect.json"
step "b2: 1 chunk uploaded ($inc bytes on the server), 12 reused"

# ---- another "cluster": the source, its snapshots and its pool are gone ----
nbdctl snapshot delete s1 >/dev/null
nbdctl snapshot delete s2 >/dev/null
nbdctl volume delete src >/dev/null
daemon_stop
rm -rf "$W/pool"
daemon_start "$W/pool2"
expect_fail -i 1 "does not exist" nbdctl backup restore nope "${T[@]}" --volume r0 --wait
nbdctl -o json backup restore b1 "${T[@]}" --volume r1 --wait >"$W/r1.json" 2>"$W/err" ||
  { cat "$W/err" >&2; die "restore of b1 failed"; }
jqx '.state == "succeeded" and .chunks_restored == 13' <"$W/r1.json"
nbdctl backup restore b2 "${T[@]}" --volume r2 --wait >/dev/null 2>"$W/err" ||
  { cat "$W/err" >&2; die "restore of b2 failed"; }
[ "$(vol_sha r1)" = "$sha_s1" ] || die "r1 differs from s1"
[ "$(vol_sha r2)" = "$sha_s2" ] || die "r2 differs from s2"
alloc=$(( $(stat -c %b "$W/pool2/volumes/r1.img") * 512 ))
[ "$alloc" -le $((41 * MiB)) ] || die "r1 allocates $alloc bytes for 40 MiB of data: holes were filled"
expect_fail -i 1 "already exists" nbdctl backup restore b1 "${T[@]}" --volume r1
step "b1 and b2 restored bit-exact on a fresh pool (r1 allocates $alloc bytes of 256 MiB)"

# ---- delete b1: only its own version of the changed chunk goes ----
nbdctl -o json backup delete b1 "${T[@]}" >"$W/del.json"
jqx '.gc_deferred == false and .chunks_deleted == 1 and .chunks_kept == 13' <"$W/del.json"
read -r n3 _ <<<"$(server_chunks)"
[ "$n3" = 13 ] || die "server holds $n3 chunks after deleting b1, want 13"
nbdctl -o json backup list "${T[@]}" | jqx '.backups | map(.name) == ["b2"]'
nbdctl backup restore b2 "${T[@]}" --volume r3 --wait >/dev/null 2>"$W/err" ||
  { cat "$W/err" >&2; die "restore of b2 after deleting b1 failed"; }
[ "$(vol_sha r3)" = "$sha_s2" ] || die "r3 differs from s2"
expect_fail -i 1 "does not exist" nbdctl backup delete b1 "${T[@]}"
step "b1 deleted: 1 chunk freed, b2 still restores"

# ---- a corrupt chunk on the server is refused, and the half volume removed ----
victim=$(find "$W/s3/$BUCKET/$PREFIX/chunks" -name '*._S3rver_object' | sort | head -n 1)
cp "$victim" "$W/victim.bak"
head -c 1000 /dev/urandom >"$victim"
expect_fail -i 1 "corrupt" nbdctl backup restore b2 "${T[@]}" --volume r4 --wait
nbdctl -o json volume list | jqx '[.volumes[].name] | index("r4") == null'
cp "$W/victim.bak" "$victim"
step "corrupt chunk refused at restore; r4 not left behind"

# ---- a live volume, with a bandwidth limit ----
vol_create live 64Mi
random_file "$W/live" $((12 * MiB))
nbd_pwrite live 0 "$W/live"
t0=$(date +%s.%N)
backup b3 --volume live --bandwidth 4Mi
t1=$(date +%s.%N)
secs=$(awk -v a="$t0" -v c="$t1" 'BEGIN { printf "%.2f", c - a }')
# 12 MiB of random data at 4 MiB/s: the first chunk goes at once, the other two at the limit.
awk -v s="$secs" 'BEGIN { exit !(s >= 1.9) }' || die "b3 took ${secs}s: the 4 MiB/s limit was not applied"
jqx '.chunks_uploaded == 3 and .volume == "live" and .bandwidth_bytes_per_s == 4194304' <"$W/job.b3.json"
nbdctl -o json snapshot list | jqx '.snapshots | length == 0'  # the temporary snapshot is gone
nbdctl backup restore b3 "${T[@]}" --volume r5 --wait >/dev/null 2>"$W/err" ||
  { cat "$W/err" >&2; die "restore of b3 failed"; }
[ "$(vol_sha r5)" = "$(vol_sha live)" ] || die "r5 differs from live"
step "b3 of a live volume in ${secs}s at 4 MiB/s; restored"

# ---- job without --wait, then polled ----
nbdctl -o json backup create b4 "${T[@]}" --volume live >"$W/b4.json"
id=$(jq -r .id "$W/b4.json")
nbdctl -o json backup job "$id" --wait >"$W/b4done.json" 2>/dev/null || die "job $id failed"
jqx '.state == "succeeded" and .chunks_uploaded == 0 and .chunks_reused == 3' <"$W/b4done.json"
nbdctl -o json backup jobs | jqx "[.jobs[].id] | index(\"$id\") != null"

# ---- listings longer than one page (1000 keys): 1005 stray objects under chunks/, as crashed
# backups could leave, are all seen and collected ----
mkdir -p "$W/junk"
seq 1 1005 | xargs -P 8 -I{} curl -sf --aws-sigv4 aws:amz:us-east-1:s3 \
  --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
  -X PUT --data-binary {} \
  -o /dev/null "$ENDPOINT/$BUCKET/$PREFIX/chunks/zz/stray{}" || die "putting stray objects failed"
nbdctl -o json backup delete b4 "${T[@]}" >"$W/del4.json"
jqx '.gc_deferred == false and .chunks_deleted == 1005' <"$W/del4.json"
step "1005 stray objects collected through paged listings"

# ---- kill -9 of the daemon in the middle of a backup: no backup is listed, the retry works ----
random_file "$W/live2" $((12 * MiB))
nbd_pwrite live 0 "$W/live2"
sha_live2=$(vol_sha live)
nbdctl -o json backup create b5 "${T[@]}" --volume live --bandwidth 2Mi >"$W/b5.json"
id=$(jq -r .id "$W/b5.json")
job_uploaded() { nbdctl -o json backup job "$id" | jq -e '.chunks_uploaded >= 1'; }
wait_for 30 job_uploaded || die "b5 uploaded nothing within 30 s"
kill -9 "$DAEMON_PID"
daemon_reap
daemon_start "$W/pool2"
nbdctl -o json backup list "${T[@]}" | jqx '[.backups[].name] | index("b5") == null'
expect_fail -i 1 "does not exist" nbdctl backup inspect b5 "${T[@]}"
# The dead backup's lease holds garbage collection off until it expires (repository.h).
nbdctl -o json backup delete b3 "${T[@]}" | jqx '.gc_deferred == true'
backup b5 --volume live
jqx '.state == "succeeded" and .chunks_reused >= 1' <"$W/job.b5.json"
nbdctl backup restore b5 "${T[@]}" --volume r6 --wait >/dev/null 2>"$W/err" ||
  { cat "$W/err" >&2; die "restore of b5 failed"; }
[ "$(vol_sha r6)" = "$sha_live2" ] || die "r6 differs from the volume b5 backed up"
step "kill -9 mid-backup: no b5 listed, gc deferred by the dead lease, the retry reused its chunks"

# ---- kill -9 of the daemon in the middle of a restore: the half volume is gone after the
# restart, the retry restores it whole ----
vol_create big 256Mi
random_file "$W/big" $((256 * MiB))
nbdcopy "$W/big" "$(nbd_uri big)" || die "nbdcopy to big failed"
sha_big=$(sha256sum <"$W/big" | cut -d' ' -f1)
backup b6 --volume big
nbdctl -o json backup restore b6 "${T[@]}" --volume r7 >"$W/r7.json"
id=$(jq -r .id "$W/r7.json")
job_restored() { nbdctl -o json backup job "$id" | jq -e '.chunks_restored >= 1'; }
wait_for 30 job_restored || die "the restore of b6 wrote nothing within 30 s"
nbdctl -o json backup job "$id" | jqx '.state == "running"'
kill -9 "$DAEMON_PID"
daemon_reap
daemon_start "$W/pool2"
nbdctl -o json volume list | jqx '[.volumes[].name] | index("r7") == null'
grep -q 'volume "r7" was being restored when the daemon stopped' "$W/datapathd.log" ||
  die "the restart did not say it removed r7"
nbdctl backup restore b6 "${T[@]}" --volume r7 --wait >/dev/null 2>"$W/err" ||
  { cat "$W/err" >&2; die "the retried restore of b6 failed"; }
[ "$(vol_sha r7)" = "$sha_big" ] || die "r7 differs from big"
step "kill -9 mid-restore: the half volume was removed at restart, the retry is whole"

# ---- client-side encryption: another prefix, the key from a file (and from the environment);
# the objects on the server hold no known plaintext, while a plain backup of the same data does ----
EP=$PREFIX-encrypted
ET=(--target "s3://$BUCKET/$EP" --endpoint "$ENDPOINT" --region us-east-1)
KEY="it passphrase $(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$KEY" >"$W/enc.key"
printf 'not the key\n' >"$W/wrong.key"
MARKER=NBDCSI-KNOWN-PLAINTEXT-7f3a9c
# 12 MiB of random data with the marker at the start of every 4 KiB: zstd cannot shrink the
# random bytes around it, so a plain chunk stores the marker verbatim (Huffman-coded text would
# hide it and prove nothing).
$PY - "$W/marked" "$MARKER" <<'PY'
import os, sys
marker = sys.argv[2].encode()
with open(sys.argv[1], "wb") as f:
    for _ in range((12 << 20) // 4096):
        f.write(marker + os.urandom(4096 - len(marker)))
PY
vol_create esrc 32Mi
nbd_pwrite esrc 0 "$W/marked"
nbdctl snapshot create es1 --volume esrc --wait >/dev/null
sha_es1=$(vol_sha esrc)
nbdctl -o json backup create e1 "${ET[@]}" --snapshot es1 --encryption-key-file "$W/enc.key" \
  --wait >"$W/job.e1.json" 2>"$W/err" || { cat "$W/err" >&2; die "encrypted backup e1 failed"; }
jqx '.state == "succeeded" and .chunks_uploaded == 3' <"$W/job.e1.json"
[ -f "$W/s3/$BUCKET/$EP/config.json._S3rver_object" ] || die "no config.json in the encrypted prefix"
! grep -rqF "$MARKER" "$W/s3/$BUCKET/$EP" || die "the encrypted prefix holds the plaintext marker"
! grep -rqF "es1" "$W/s3/$BUCKET/$EP/manifests" || die "the encrypted manifest names its snapshot"
# Chunk names are not the SHA-256 of the content.
first=$(head -c $CHUNK "$W/marked" | sha256sum | cut -d' ' -f1)
[ -z "$(find "$W/s3/$BUCKET/$EP/chunks" -name "$first*")" ] || die "a chunk is named by its SHA-256"
# The control: the same snapshot backed up without a key shows both, so the checks above can fail.
backup eplain --snapshot es1
grep -rqF "$MARKER" "$W/s3/$BUCKET/$PREFIX/chunks" || die "the control: no marker in plain chunks"
[ -n "$(find "$W/s3/$BUCKET/$PREFIX/chunks" -name "$first*")" ] || die "the control: no SHA-256 name"
nbdctl backup delete eplain "${T[@]}" >/dev/null
NBDCSI_BACKUP_ENCRYPTION_KEY=$KEY nbdctl -o json backup list "${ET[@]}" |
  jqx '.backups | length == 1 and .[0].name == "e1" and .[0].encrypted == true and .[0].source_snapshot == "es1"'
nbdctl -o json backup list "${T[@]}" | jqx '.backups | all(.encrypted == false)'
nbdctl backup inspect e1 "${ET[@]}" --encryption-key-file "$W/enc.key" | grep -q 'Encrypted.*yes' ||
  die "inspect does not say e1 is encrypted"
# Clear errors, and nothing is written by a refused call.
before=$(find "$W/s3/$BUCKET/$EP" -type f | sort | xargs sha256sum | sha256sum)
expect_fail -i 1 "wrong encryption key for s3://$BUCKET/$EP" nbdctl backup restore e1 "${ET[@]}" \
  --encryption-key-file "$W/wrong.key" --volume er0 --wait
expect_fail -i 1 "(permission denied)" nbdctl backup list "${ET[@]}" --encryption-key-file "$W/wrong.key"
expect_fail -i 1 "is encrypted: give its encryption key (invalid argument)" nbdctl backup create e2 \
  "${ET[@]}" --snapshot es1
expect_fail -i 1 "is encrypted: give its encryption key" nbdctl backup delete e1 "${ET[@]}"
expect_fail -i 1 "holds unencrypted backups" nbdctl backup list "${T[@]}" --encryption-key-file "$W/enc.key"
[ "$(find "$W/s3/$BUCKET/$EP" -type f | sort | xargs sha256sum | sha256sum)" = "$before" ] ||
  die "a refused call changed the encrypted prefix"
nbdctl -o json volume list | jqx '[.volumes[].name] | index("er0") == null'
nbdctl backup restore e1 "${ET[@]}" --encryption-key-file "$W/enc.key" --volume er1 --wait \
  >/dev/null 2>"$W/err" || { cat "$W/err" >&2; die "restore of e1 failed"; }
[ "$(vol_sha er1)" = "$sha_es1" ] || die "er1 differs from es1"
# A flipped byte in a stored chunk: the restore fails naming the chunk's key.
victim=$(find "$W/s3/$BUCKET/$EP/chunks" -name '*._S3rver_object' | sort | head -n 1)
victim_key=$(basename "$victim" ._S3rver_object)
cp "$victim" "$W/victim.bak"
$PY -c 'import sys; p=sys.argv[1]; b=bytearray(open(p,"rb").read()); b[len(b)//2]^=1; open(p,"wb").write(b)' "$victim"
expect_fail -i 1 "$victim_key" nbdctl backup restore e1 "${ET[@]}" --encryption-key-file "$W/enc.key" \
  --volume er2 --wait
grep -qF "corrupt" "$W/err" || die "the tampered chunk was not called corrupt: $(cat "$W/err")"
cp "$W/victim.bak" "$victim"
nbdctl -o json backup delete e1 "${ET[@]}" --encryption-key-file "$W/enc.key" |
  jqx '.gc_deferred == false and .chunks_deleted == 3'
! grep -qF "$KEY" "$W/datapathd.log" || die "the encryption key is in the daemon's log"
step "encrypted backup: no plaintext marker or SHA-256 names on the server, restored bit-exact; wrong, missing and unexpected keys refused writing nothing; a flipped byte refused"

# ---- clear errors, never a hang ----
expect_fail -i 1 "credentials were refused" env AWS_ACCESS_KEY_ID=nobody \
  "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" backup list "${T[@]}"
expect_fail -i 1 "bucket \"nosuchbucket\" does not exist" nbdctl backup list \
  --target s3://nosuchbucket/x --endpoint "$ENDPOINT"
dead=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
expect_fail -i 1 "couldn't connect" nbdctl --timeout 20 backup list --target s3://bkt/x \
  --endpoint "http://127.0.0.1:$dead"
expect_fail -i 2 "no credentials" env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
  "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" backup list "${T[@]}"
expect_fail -i 1 "s3://" nbdctl backup list --target http://x/y --endpoint "$ENDPOINT"
printf '[default]\naws_access_key_id = S3RVER\naws_secret_access_key = S3RVER\n' >"$W/creds"
env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" \
  backup list "${T[@]}" --credentials-file "$W/creds" | grep -q '^b2 ' ||
  die "list with --credentials-file failed"
# The secret never reaches the daemon's log.
! grep -q "$AWS_SECRET_ACCESS_KEY" "$W/datapathd.log" || die "the secret key is in the daemon's log"
step "errors: bad credentials, missing bucket, dead endpoint, no credentials"

daemon_stop
step "done"
