#!/usr/bin/env bash
# fio's nbd engine: four jobs, each with its own NBD connection and its own 32 MiB region,
# random 4k writes at QD8 verified with crc32c; the four connections must really be open at once.
. "$(dirname "$0")/lib.sh"
need fio ss
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
lib_init
daemon_start
vol_create f 256Mi

cat >"$W/job.fio" <<JOB
[global]
ioengine=nbd
uri=$(nbd_uri f)
bs=4k
iodepth=8
size=32M
offset_increment=32M
numjobs=4
verify=crc32c
verify_fatal=1
verify_backlog=512
group_reporting=1
[mixed]
rw=randwrite
JOB

# Sample the server side while fio runs and keep the maximum: proof of 4 parallel connections.
( max=0; while :; do n=$(nbd_conn_count f); [ "$n" -gt "$max" ] && { max=$n; echo "$max" >"$W/maxconn"; }; sleep 0.02; done ) &
sampler=$!; LIB_PIDS+=("$sampler")
step "fio: 4 jobs x 32 MiB random write + crc32c verify"
(cd "$W" && fio --output-format=json --output="$W/fio.json" "$W/job.fio") || { cat "$W/fio.json" >&2; die "fio failed"; }
kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
maxconn=$(cat "$W/maxconn" 2>/dev/null || echo 0)
echo "max concurrent NBD connections seen: $maxconn" >&2
[ "$maxconn" -ge 4 ] || die "only $maxconn NBD connections were open at once (want 4)"
errs=$(jq '[.jobs[].error] | add' "$W/fio.json")
[ "$errs" = 0 ] || die "fio reported error $errs"
written=$(jq '[.jobs[].write.io_bytes] | add' "$W/fio.json")
[ "$written" -ge $((128 << 20)) ] || die "fio wrote only $written bytes (want 128 MiB)"
verified=$(jq '[.jobs[].read.io_bytes] | add' "$W/fio.json")
[ "$verified" -ge $((128 << 20)) ] || die "fio verified only $verified bytes (want 128 MiB)"
if is_datapathd; then
  nbdctl -o json stats f >"$W/stats.json" 2>/dev/null && step "stats: $(jq -c . "$W/stats.json" | head -c 300)"
fi
daemon_alive || die "daemon died"
daemon_stop
