#!/usr/bin/env bash
# A backend export (NAME@target, issue 16) through real NBD clients: backend_export_server runs the
# engine with an in-memory ExportBackend that completes from its own thread; nbdinfo must list and
# describe it, nbdcopy must copy 32 MiB of random data in and out unchanged (4 connections each
# way), and fio's nbd engine must pass a random-write crc32c verify on 4 connections at once.
# Then a SIGTERM: the server removes the export, waits for requests in flight, and exits 0 only if
# the engine saw no stale completion and no broken invariant.
. "$(dirname "$0")/lib.sh"
SERVER=${1:?usage: backend_export.sh PATH/backend_export_server}
[ "$NBDCSI_SERVER" = datapathd ] || skip "backend exports are the engine's own (NBDCSI_SERVER=$NBDCSI_SERVER)"
need nbdinfo nbdcopy fio jq cmp
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
lib_init

SIZE=$((256 << 20))
SOCK=$W/target.sock
"$SERVER" --socket "$SOCK" --pool "$W/pool" --name rv1 --size "$SIZE" >"$W/server.out" 2>"$W/server.log" &
SERVER_PID=$!
LIB_PIDS+=("$SERVER_PID")
wait_for 20 grep -qx ready "$W/server.out" || { cat "$W/server.out" "$W/server.log" >&2; die "server not ready"; }
URI="nbd+unix:///rv1@target?socket=$SOCK"

step "nbdinfo: listed, described, sized"
nbdinfo --list "nbd+unix:///?socket=$SOCK" >"$W/list.txt" || die "nbdinfo --list failed"
grep -q 'export="rv1@target"' "$W/list.txt" || { cat "$W/list.txt" >&2; die "rv1@target not listed"; }
nbdinfo --json "$URI" >"$W/info.json" || die "nbdinfo failed"
[ "$(jq '.exports[0]."export-size"' "$W/info.json")" = "$SIZE" ] || die "wrong size: $(cat "$W/info.json")"
[ "$(jq -r '.exports[0].description' "$W/info.json")" = "nbd-csi replicated volume (target)" ] ||
  die "wrong description: $(jq -r '.exports[0].description' "$W/info.json")"
[ "$(jq '.exports[0].is_read_only' "$W/info.json")" = false ] || die "exported read-only"
[ "$(jq '.exports[0].can_multi_conn' "$W/info.json")" = true ] || die "no CAN_MULTI_CONN"
[ "$(jq '.exports[0].can_flush' "$W/info.json")" = true ] || die "no SEND_FLUSH"
[ "$(jq '.exports[0].can_fua' "$W/info.json")" = true ] || die "no SEND_FUA"
[ "$(jq '.exports[0].can_trim' "$W/info.json")" = true ] || die "no SEND_TRIM"
[ "$(jq '.exports[0].can_zero' "$W/info.json")" = true ] || die "no SEND_WRITE_ZEROES"
if nbdinfo "nbd+unix:///nope@target?socket=$SOCK" >/dev/null 2>"$W/nope.err"; then
  die "an unregistered target was served"
fi

step "nbdcopy: 32 MiB of random data in and out"
head -c $((32 << 20)) /dev/urandom >"$W/in.bin"
nbdcopy --connections=4 "$W/in.bin" "$URI" || die "nbdcopy in failed"
# The whole export back out: the copied head must match, the untouched rest must read as zeroes.
nbdcopy --connections=4 "$URI" "$W/out.bin" || die "nbdcopy out failed"
[ "$(stat -c %s "$W/out.bin")" = "$SIZE" ] || die "copied out $(stat -c %s "$W/out.bin") bytes"
cmp -n $((32 << 20)) "$W/in.bin" "$W/out.bin" || die "data copied out differs from data copied in"
cmp -i $((32 << 20)) -n $((SIZE - (32 << 20))) "$W/out.bin" /dev/zero || die "unwritten space is not zeroes"

step "fio (libnbd): 4 jobs x 32 MiB random write + crc32c verify"
cat >"$W/job.fio" <<JOB
[global]
ioengine=nbd
uri=$URI
bs=4k
iodepth=8
size=32M
offset=64M
offset_increment=32M
numjobs=4
verify=crc32c
verify_fatal=1
verify_backlog=512
group_reporting=1
[target]
rw=randwrite
JOB
(cd "$W" && fio --output-format=json --output="$W/fio.json" "$W/job.fio") || { cat "$W/fio.json" >&2; die "fio failed"; }
errs=$(jq '[.jobs[].error] | add' "$W/fio.json")
[ "$errs" = 0 ] || die "fio reported error $errs"
written=$(jq '[.jobs[].write.io_bytes] | add' "$W/fio.json")
[ "$written" -ge $((128 << 20)) ] || die "fio wrote only $written bytes (want 128 MiB)"
verified=$(jq '[.jobs[].read.io_bytes] | add' "$W/fio.json")
[ "$verified" -ge $((128 << 20)) ] || die "fio verified only $verified bytes (want 128 MiB)"
# fio wrote above the first 64 MiB: nbdcopy's data must still be there.
nbdcopy "$URI" "$W/out2.bin" || die "nbdcopy out (after fio) failed"
cmp -n $((32 << 20)) "$W/in.bin" "$W/out2.bin" || die "fio's writes reached nbdcopy's region"

step "SIGTERM: export removed, engine clean"
kill -TERM "$SERVER_PID"
rc=0
wait "$SERVER_PID" || rc=$?
[ "$rc" = 0 ] || { cat "$W/server.out" "$W/server.log" >&2; die "server exited with $rc"; }
# spdlog writes to stdout, beside "ready".
grep -q "backend export rv1@target removed" "$W/server.out" || { cat "$W/server.out" >&2; die "no clean removal"; }
step "ok"
