#!/usr/bin/env bash
# Functional test of the per-volume throttle through a real client (fio's nbd engine, QD32):
# a 500 read-IOPS cap holds, raising it live to 2000 takes effect on the next run, and the write
# cap is enforced on its own. Bands are +-20 %: this checks the throttle, it is not a benchmark.
. "$(dirname "$0")/lib.sh"
need fio jq
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
is_datapathd || skip "QoS is a nbd-datapathd feature"
lib_init
daemon_start
vol_create q 1Gi --max-read-iops 500 --max-write-iops 300

# measure RW -> IOPS of a 4 s, QD32, 4k random run (1 s ramp so the bucket's burst is not counted)
measure() {
  local rw=$1 dir=read
  [ "$rw" = randwrite ] && dir=write
  fio --name=q --ioengine=nbd --uri="$(nbd_uri q)" --rw="$rw" --bs=4k --iodepth=32 \
    --size=256M --time_based --ramp_time=1 --runtime=4 --output-format=json \
    --output="$W/fio.$rw.json" >/dev/null || die "fio $rw failed: $(cat "$W/fio.$rw.json")"
  jq -r ".jobs[0].$dir.iops | floor" "$W/fio.$rw.json"
}
band() {  # band WHAT VALUE LO HI
  echo "$1: $2 IOPS (want $3..$4)" >&2
  [ "$2" -ge "$3" ] && [ "$2" -le "$4" ] || die "$1: $2 IOPS outside $3..$4"
}

step "read cap 500"
band "randread @500" "$(measure randread)" 400 600
step "raise the read cap live to 2000"
nbdctl volume qos q --max-read-iops 2000 >/dev/null || die "nbdctl volume qos failed"
band "randread @2000" "$(measure randread)" 1600 2400
step "write cap 300 is independent of the read cap"
band "randwrite @300" "$(measure randwrite)" 240 360
step "removing the caps lets reads run far above 2000"
nbdctl volume qos q --clear >/dev/null || die "nbdctl volume qos --clear failed"
free=$(measure randread)
echo "randread uncapped: $free IOPS" >&2
[ "$free" -gt 3000 ] || die "uncapped randread only $free IOPS: the cap did not go away"
daemon_stop
