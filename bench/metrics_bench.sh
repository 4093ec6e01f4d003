#!/usr/bin/env bash
# What /metrics costs the data path: 4k random reads at QD32 (fio's nbd engine) against
# nbd-datapathd without --metrics-listen and with it while a scraper reads /metrics every
# second (15 times Prometheus' default rate), alternated ROUNDS times in one run on one volume
# so that drift of a shared machine hits both sides alike. Prints each cell, the medians and
# on/off. Not a CTest test.
#
#   bench/metrics_bench.sh             RUNTIME=10 RAMP=2 ROUNDS=3 BENCH_DIR=/var/tmp NBDCSI_BIN=build/bin
#
# The per-volume counters themselves (pool/stats.h shards) are always kept: nbdctl volume stats
# reads them too. What the flag adds is the HTTP server and the scrapes that fold them.
. "$(dirname "$0")/../test/integration/lib.sh"
need fio jq curl nbdcopy
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
ROUNDS=${ROUNDS:-3}
NBDCSI_SERVER=datapathd
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
lib_init
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

step "a 1 GiB volume full of data (reads must hit real blocks, not holes)"
daemon_start
vol_create bench 1Gi
fio --name=fill --filename="$W/fill.raw" --rw=write --bs=1M --size=1G --ioengine=psync \
  --refill_buffers --output=/dev/null || die "fill failed"
nbdcopy "$W/fill.raw" "$(nbd_uri bench)" || die "nbdcopy failed"
rm -f "$W/fill.raw"
daemon_stop

results=$W/results.tsv
: >"$results"
for round in $(seq "$ROUNDS"); do
  # The order alternates (off on, on off, ...): whatever favours the second run of a pair (a
  # warmer cache, a quieter neighbour) favours each side as often.
  order="off on"
  [ $((round % 2)) = 0 ] && order="on off"
  for mode in $order; do
    if [ $mode = on ]; then
      daemon_start -- --metrics-listen "127.0.0.1:$PORT"
      wait_for 10 curl -sf "http://127.0.0.1:$PORT/readyz" || die "/readyz not 200"
      bg bash -c "while :; do curl -sf -o /dev/null http://127.0.0.1:$PORT/metrics; sleep 1; done"
      SCRAPER=$BG_PID
    else
      daemon_start
    fi
    out=$W/fio.$round.$mode.json
    fio --name=randread32 --ioengine=nbd --uri="$(nbd_uri bench)" --rw=randread --bs=4k \
      --iodepth=32 --size=1G --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
      --output-format=json --output="$out" >/dev/null || die "fio failed ($mode)"
    iops=$(jq '.jobs[0].read.iops' "$out")
    if [ $mode = on ]; then
      scrapes=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^exposer_scrapes_total/ { print $2 }')
      kill "$SCRAPER" 2>/dev/null || true
      step "round $round, metrics on: $(printf '%.0f' "$iops") IOPS ($scrapes scrapes)"
    else
      step "round $round, metrics off: $(printf '%.0f' "$iops") IOPS"
    fi
    printf '%s\t%s\t%s\n' "$round" "$mode" "$iops" >>"$results"
    daemon_stop
  done
done

"$PY" - "$results" "$RUNTIME" "$RAMP" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1])]
on = [float(r[2]) for r in rows if r[1] == "on"]
off = [float(r[2]) for r in rows if r[1] == "off"]
print(f"4k randread QD32, fio nbd engine, runtime {sys.argv[2]} s, ramp {sys.argv[3]} s, "
      f"{len(on)} rounds alternated\n")
print("| round | metrics off (IOPS) | metrics on (IOPS) | on / off |")
print("|---|---|---|---|")
for i, (a, b) in enumerate(zip(off, on), 1):
    print(f"| {i} | {a:.0f} | {b:.0f} | {b / a:.3f} |")
m_off, m_on = statistics.median(off), statistics.median(on)
# Each round's on/off pair ran back to back: drift of a shared machine hits both alike, so the
# paired ratios are the measurement; their median is the cost.
ratios = [b / a for a, b in zip(off, on)]
cost = (1 - statistics.median(ratios)) * 100
print(f"| median | {m_off:.0f} | {m_on:.0f} | {statistics.median(ratios):.3f} (of the pairs) |\n")
# The same configuration measured ROUNDS times: if it alone varies by more than the goal, the
# machine is too noisy for the comparison to say anything.
noise = (max(off) / min(off) - 1) * 100
verdict = "PASS" if cost < 2 else "MISS"
if noise > 2:
    verdict = f"INCONCLUSIVE (the off runs alone vary by {noise:.0f} %: a quiet machine is needed)"
print(f"cost of metrics on: {cost:+.1f} % (goal: under 2 %): {verdict}")
PY
