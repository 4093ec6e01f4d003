#!/usr/bin/env bash
# nbd-datapathd's /metrics as an operator sees it: a real Prometheus server (Debian's package)
# scrapes the daemon every second while real NBD clients (fio's nbd engine, libnbd's nbdsh) do a
# known number of requests; Prometheus' HTTP query API must then report exactly those counts, the
# latency histograms must be well formed, the QoS metrics must rise when a limit bites, `promtool
# check metrics` must accept the exposition, and /healthz and /readyz must answer 200.
#
# Accounting rules checked here (README "Metrics and health"): every NBD command the daemon reads
# counts once, in the kind's nbdcsi_volume_requests_total, when its reply is queued (so a client
# that has its reply is counted); failed ones count there too and in ..._errors_total by NBD error
# code; bytes count for successful READ/WRITE (data) and TRIM/WRITE_ZEROES (range) only.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/prometheus_lib.sh"
need fio jq curl prometheus promtool nbdsh
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
is_datapathd || skip "metrics are a nbd-datapathd feature"
lib_init

free_ports 2
MPORT=${PORTS[0]} PPORT=${PORTS[1]}
M=http://127.0.0.1:$MPORT

step "bad --metrics-listen values are refused with the flag's name (exit 2)"
for bad in localhost:9 127.0.0.1 http://127.0.0.1:9 127.0.0.1:0; do
  rc=0
  "$NBDCSI_BIN/nbd-datapathd" --pool "$W/badpool" --api "unix://$W/bad.sock" \
    --nbd-listen "unix://$W/badnbd.sock" --metrics-listen "$bad" >"$W/bad.log" 2>&1 || rc=$?
  [ $rc = 2 ] || die "--metrics-listen $bad: exit $rc, want 2"
  grep -q -- "--metrics-listen" "$W/bad.log" || die "--metrics-listen $bad: no clear error: $(cat "$W/bad.log")"
done

daemon_start -- --metrics-listen "127.0.0.1:$MPORT" --workers 2
wait_for 10 curl -sf "$M/readyz" || die "/readyz did not answer 200: $(curl -s "$M/readyz")"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$M/healthz")" = 200 ] || die "/healthz is not 200"
[ "$(curl -s "$M/readyz")" = ok ] || die "/readyz body: $(curl -s "$M/readyz")"
vol_create m 256Mi
vol_create ro 16Mi --read-only

step "a real Prometheus scrapes the daemon every second"
cat >"$W/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: nbd-datapathd
    static_configs:
      - targets: ['127.0.0.1:$MPORT']
YML
prom_start "$W/prometheus.yml" "$PPORT"

until_eq 30 'up{job="nbd-datapathd"}' 1 ||
  die "Prometheus never scraped the datapath: $(curl -s "$P/api/v1/targets" | jq -c '.data.activeTargets[0].lastError')"
until_eq 10 'nbdcsi_volume_requests_total{volume="m",op="read"}' 0 || die "no zero baseline"

step "fio: 4k random reads and writes through the nbd engine, counted by fio"
fio --name=w --ioengine=nbd --uri="$(nbd_uri m)" --rw=randwrite --bs=4k --iodepth=16 \
  --size=64M --number_ios=3000 --output-format=json --output="$W/fio-w.json" >/dev/null ||
  die "fio randwrite failed: $(cat "$W/fio-w.json")"
fio --name=r --ioengine=nbd --uri="$(nbd_uri m)" --rw=randread --bs=4k --iodepth=16 \
  --size=64M --number_ios=5000 --output-format=json --output="$W/fio-r.json" >/dev/null ||
  die "fio randread failed: $(cat "$W/fio-r.json")"
W_IOS=$(jq '.jobs[0].write.total_ios' "$W/fio-w.json")
R_IOS=$(jq '.jobs[0].read.total_ios' "$W/fio-r.json")
W_BYTES=$(jq '.jobs[0].write.io_bytes' "$W/fio-w.json")
R_BYTES=$(jq '.jobs[0].read.io_bytes' "$W/fio-r.json")
echo "fio: $R_IOS reads ($R_BYTES bytes), $W_IOS writes ($W_BYTES bytes)" >&2
[ "$R_IOS" -gt 0 ] && [ "$W_IOS" -gt 0 ] || die "fio did no I/O"

step "nbdsh: 7 flushes, 5 trims of 64 KiB, 3 zeroes of 1 MiB, 4 writes refused (read-only)"
nbdsh -u "$(nbd_uri m)" -c '
for _ in range(7): h.flush()
for i in range(5): h.trim(65536, 128 << 20 | i * 65536)
for i in range(3): h.zero(1 << 20, 192 << 20 | i << 20)
' || die "nbdsh on m failed"
nbdsh -u "$(nbd_uri ro)" -c '
import nbd
h.set_strict_mode(0)
errs = 0
for _ in range(4):
    try:
        h.pwrite(b"x" * 512, 0)
    except nbd.Error as e:
        errs += 1
assert errs == 4, errs
' || die "nbdsh on ro failed"
# fio's nbd engine sends no FLUSH unless asked (no fsync options above), and nbdsh none
# implicitly: every command is one of those counted.

step "Prometheus reports exactly the clients' counts"
V='volume="m"'
until_eq 20 "nbdcsi_volume_requests_total{$V,op=\"read\"}" "$R_IOS" || die "read count"
until_eq 10 "nbdcsi_volume_requests_total{$V,op=\"write\"}" "$W_IOS" || die "write count"
until_eq 10 "nbdcsi_volume_requests_total{$V,op=\"flush\"}" 7 || die "flush count"
until_eq 10 "nbdcsi_volume_requests_total{$V,op=\"trim\"}" 5 || die "trim count"
until_eq 10 "nbdcsi_volume_requests_total{$V,op=\"zero\"}" 3 || die "zero count"
until_eq 10 "nbdcsi_volume_request_bytes_total{$V,op=\"read\"}" "$R_BYTES" || die "read bytes"
until_eq 10 "nbdcsi_volume_request_bytes_total{$V,op=\"write\"}" "$W_BYTES" || die "write bytes"
until_eq 10 "nbdcsi_volume_request_bytes_total{$V,op=\"trim\"}" $((5 * 65536)) || die "trim bytes"
until_eq 10 "nbdcsi_volume_request_bytes_total{$V,op=\"zero\"}" $((3 << 20)) || die "zero bytes"
until_eq 10 'nbdcsi_volume_requests_total{volume="ro",op="write"}' 4 || die "refused writes"
until_eq 10 'nbdcsi_volume_request_errors_total{volume="ro",op="write",errno="EPERM"}' 4 ||
  die "EPERM errors"
[ "$(q "sum(nbdcsi_volume_request_errors_total{$V})")" = "" ] || die "errors on m"
until_eq 10 "nbdcsi_volume_inflight_requests{$V}" 0 || die "requests left in flight"
until_eq 10 "nbdcsi_volume_provisioned_bytes{$V}" $((256 << 20)) || die "provisioned bytes"
alloc=$(q "nbdcsi_volume_allocated_bytes{$V}")
[ "${alloc%.*}" -gt 0 ] || die "allocated bytes $alloc after writes"
[ "$(q nbdcsi_pool_volumes)" = 2 ] || die "pool volumes $(q nbdcsi_pool_volumes)"
[ "$(q 'nbdcsi_engine_workers_running')" = 2 ] || die "workers running"

step "histograms: buckets cumulative, +Inf = _count = requests"
for op in read write flush trim zero; do
  curl -sf "$P/api/v1/query" --data-urlencode \
    "query=nbdcsi_volume_request_duration_seconds_bucket{$V,op=\"$op\"}" >"$W/h.json"
  count=$(q "nbdcsi_volume_request_duration_seconds_count{$V,op=\"$op\"}")
  want=$(q "nbdcsi_volume_requests_total{$V,op=\"$op\"}")
  jq -e --arg count "$count" '
    [.data.result[] | {le: (.metric.le | if . == "+Inf" then infinite else tonumber end),
                       v: (.value[1] | tonumber)}] | sort_by(.le) as $b
    | ($b | length) == 24
      and ([range(1; $b | length) | $b[.].v >= $b[. - 1].v] | all)
      and ($b[-1].le == infinite) and ($b[-1].v == ($count | tonumber))' "$W/h.json" >/dev/null ||
    die "histogram of $op is malformed: $(jq -c '[.data.result[] | [.metric.le, .value[1]]]' "$W/h.json")"
  [ "$count" = "$want" ] || die "histogram $op: _count $count, requests $want"
done

step "QoS: a 200 read-IOPS cap makes the throttle metrics rise"
[ "$(q "nbdcsi_volume_qos_delayed_requests_total{$V}")" = 0 ] || die "throttled before any limit"
nbdctl volume qos m --max-read-iops 200 >/dev/null || die "nbdctl volume qos failed"
fio --name=t --ioengine=nbd --uri="$(nbd_uri m)" --rw=randread --bs=4k --iodepth=16 \
  --size=64M --time_based --runtime=3 --output-format=json --output="$W/fio-t.json" >/dev/null ||
  die "throttled fio failed"
wait_for 15 q_any "nbdcsi_volume_qos_delayed_requests_total{$V} > 100" ||
  die "delayed requests did not rise: $(q "nbdcsi_volume_qos_delayed_requests_total{$V}")"
wait_for 10 q_any "nbdcsi_volume_qos_throttled_seconds_total{$V} > 1" ||
  die "throttled seconds did not rise: $(q "nbdcsi_volume_qos_throttled_seconds_total{$V}")"
T_IOS=$(jq '.jobs[0].read.total_ios' "$W/fio-t.json")
until_eq 10 "nbdcsi_volume_requests_total{$V,op=\"read\"}" $((R_IOS + T_IOS)) ||
  die "read count after the throttled run"

step "promtool check metrics accepts the exposition; probes answer 200"
curl -sf "$M/metrics" >"$W/metrics.txt" || die "GET /metrics failed"
promtool check metrics <"$W/metrics.txt" >"$W/promtool.out" 2>&1 ||
  die "promtool check metrics: $(cat "$W/promtool.out")"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$M/healthz")" = 200 ] || die "/healthz"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$M/readyz")" = 200 ] || die "/readyz"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$M/nothing")" = 404 ] || die "unknown path not 404"

kill -TERM "$PROM_PID"
daemon_stop
curl -s "$M/healthz" >/dev/null 2>&1 && die "the metrics port is still open after the daemon stopped"
step "done"
