#!/usr/bin/env bash
# What /metrics costs the data path: 4k random reads at QD32 (fio's nbd engine) against
# nbd-datapathd without --metrics-listen and with it while a scraper reads /metrics every
# second (15 times Prometheus' default rate), alternated ROUNDS times in one run on one volume
# so that drift of a shared machine hits both sides alike. Prints each cell, the medians and
# on/off, for two measures: IOPS, and the daemon's CPU time per I/O (utime + stime of all its
# threads from /proc/PID/stat, from the end of fio's ramp to its end, over fio's I/Os in that
# time). On a 2-core machine the CPU per I/O is the steadier one: it does not move when a
# neighbour takes a core, and CPU the daemon spends is what the application does not get.
# Then the direct cost of a scrape, which the pairs cannot resolve on a noisy machine: the hot
# path is the same code with the flag on or off (the per-volume counters and histograms are kept
# either way), so what --metrics-listen adds is the HTTP thread and the scrapes. The daemon's CPU
# time over SCRAPES back-to-back scrapes (idle, with 1 volume and with 100) gives the CPU of one
# scrape, and that, at one scrape a second, against the daemon's CPU per second under the QD32
# load above, is the cost. Not a CTest test.
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
SCRAPES=${SCRAPES:-500}
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
      --output-format=json --output="$out" >/dev/null &
    FIO_PID=$!
    sleep "$RAMP"
    ticks0=$(cpu_ticks "$DAEMON_PID")
    wait "$FIO_PID" || die "fio failed ($mode)"
    ticks1=$(cpu_ticks "$DAEMON_PID")
    iops=$(jq '.jobs[0].read.iops' "$out")
    ios=$(jq '.jobs[0].read.total_ios' "$out")
    # microseconds of daemon CPU per I/O
    cpu_us=$(awk -v t=$((ticks1 - ticks0)) -v hz="$(getconf CLK_TCK)" -v n="$ios" \
      'BEGIN { printf "%.3f", t / hz * 1e6 / n }')
    if [ $mode = on ]; then
      scrapes=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^exposer_scrapes_total/ { print $2 }')
      kill "$SCRAPER" 2>/dev/null || true
      step "round $round, metrics on: $(printf '%.0f' "$iops") IOPS, $cpu_us us CPU/IO ($scrapes scrapes)"
    else
      step "round $round, metrics off: $(printf '%.0f' "$iops") IOPS, $cpu_us us CPU/IO"
    fi
    printf '%s\t%s\t%s\t%s\n' "$round" "$mode" "$iops" "$cpu_us" >>"$results"
    daemon_stop
  done
done

step "the CPU of one scrape: $SCRAPES scrapes back to back, idle, with 1 and with 100 volumes"
scrapes=$W/scrapes.tsv
: >"$scrapes"
daemon_start -- --metrics-listen "127.0.0.1:$PORT"
wait_for 10 curl -sf "http://127.0.0.1:$PORT/readyz" || die "/readyz not 200"
scrape_cost() {  # VOLUMES -> a line: volumes, CPU ms per scrape, bytes per scrape
  local t0 t1 idle0 idle1 start end bytes
  bytes=$(curl -sf "http://127.0.0.1:$PORT/metrics" | wc -c)
  # The idle daemon's own CPU over as long, to subtract.
  start=$(date +%s.%N)
  t0=$(cpu_ticks "$DAEMON_PID")
  for _ in $(seq "$SCRAPES"); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/metrics"; done
  t1=$(cpu_ticks "$DAEMON_PID")
  end=$(date +%s.%N)
  idle0=$(cpu_ticks "$DAEMON_PID")
  sleep "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')"
  idle1=$(cpu_ticks "$DAEMON_PID")
  awk -v v="$1" -v t=$((t1 - t0 - (idle1 - idle0))) -v hz="$(getconf CLK_TCK)" -v n="$SCRAPES" \
    -v b="$bytes" 'BEGIN { printf "%s\t%.3f\t%s\n", v, t / hz * 1000 / n, b }'
}
scrape_cost 1 >>"$scrapes"
for i in $(seq 2 100); do vol_create "extra$i" 64Mi; done
scrape_cost 100 >>"$scrapes"
daemon_stop

"$PY" - "$results" "$RUNTIME" "$RAMP" "$scrapes" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
def col(mode, i):
    return [float(r[i]) for r in rows if r[1] == mode]
on, off = col("on", 2), col("off", 2)
cpu_on, cpu_off = col("on", 3), col("off", 3)
print(f"4k randread QD32, fio nbd engine, runtime {sys.argv[2]} s, ramp {sys.argv[3]} s, "
      f"{len(on)} rounds alternated\n")
print("| round | off (IOPS) | on (IOPS) | on / off | off (CPU us/IO) | on (CPU us/IO) | on / off |")
print("|---|---|---|---|---|---|---|")
for i, (a, b, c, d) in enumerate(zip(off, on, cpu_off, cpu_on), 1):
    print(f"| {i} | {a:.0f} | {b:.0f} | {b / a:.3f} | {c:.2f} | {d:.2f} | {d / c:.3f} |")
# Each round's on/off pair ran back to back: drift of a shared machine hits both alike, so the
# paired ratios are the measurement; their median is the cost.
ratios = [b / a for a, b in zip(off, on)]
cpu_ratios = [d / c for c, d in zip(cpu_off, cpu_on)]
print(f"| median | {statistics.median(off):.0f} | {statistics.median(on):.0f} | "
      f"{statistics.median(ratios):.3f} | {statistics.median(cpu_off):.2f} | "
      f"{statistics.median(cpu_on):.2f} | {statistics.median(cpu_ratios):.3f} |\n")
def verdict(name, cost, same):
    # `same`: one configuration measured ROUNDS times; if it alone varies by more than the goal,
    # the machine is too noisy for the comparison to say anything.
    noise = (max(same) / min(same) - 1) * 100
    v = "PASS" if cost < 2 else "MISS"
    if len(same) < 3:
        v = "INCONCLUSIVE (fewer than 3 rounds: the noise is not known)"
    elif noise > 2:
        v = f"INCONCLUSIVE (the off runs alone vary by {noise:.1f} %)"
    print(f"cost of metrics on, {name}: {cost:+.1f} % (goal: under 2 %): {v}")
verdict("IOPS", (1 - statistics.median(ratios)) * 100, off)
verdict("CPU per I/O", (statistics.median(cpu_ratios) - 1) * 100, cpu_off)
# The direct cost: the daemon's CPU per second under the load (off runs) against one scrape a
# second.
busy_ms = statistics.median(off) * statistics.median(cpu_off) / 1000  # CPU ms per second
print(f"\nthe daemon's CPU under the load (metrics off, medians): {busy_ms:.0f} ms per second\n")
print("| volumes | CPU per scrape (ms) | bytes per scrape | one scrape a second, of the daemon's CPU under the load | verdict (< 2 %) |")
print("|---|---|---|---|---|")
for l in open(sys.argv[4]):
    v, ms, b = l.split("\t")
    share = float(ms) / busy_ms * 100
    print(f"| {v} | {float(ms):.3f} | {int(b)} | {share:.2f} % | {'PASS' if share < 2 else 'MISS'} |")
PY
