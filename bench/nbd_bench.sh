#!/usr/bin/env bash
# Compares, in one run and on one disk, nbd-datapathd with the NBD servers people would otherwise
# use, with the raw file underneath, and with an in-memory NBD server (the transport ceiling).
# Prints two Markdown tables, throughput/latency and the servers' CPU time per million I/Os
# (docs/benchmarks.md explains the columns and the targets). Not a CTest test.
#
#   bench/nbd_bench.sh                 RUNTIME=10 RAMP=2 BENCH_DIR=/var/tmp NBDCSI_BIN=build/bin
#   WORKLOADS="randread32 qd1" TARGETS="raw datapathd" bench/nbd_bench.sh   (a subset)
#   DP_ARGS="--workers 1" bench/nbd_bench.sh     (extra nbd-datapathd flags)
. "$(dirname "$0")/../test/integration/lib.sh"
need fio nbdkit qemu-nbd nbdcopy jq
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
WORKLOADS=${WORKLOADS:-randread32 randwrite32 randread4x32 qd1 seqread seqwrite}
TARGETS=${TARGETS:-raw datapathd qemu-nbd nbdkit-file nbdkit-file-pagecache nbdkit-memory}
read -r -a DP_EXTRA <<<"${DP_ARGS:-}"
NBDCSI_SERVER=datapathd
# The data must live on the disk being measured, not on a tmpfs /tmp.
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
lib_init
HZ=$(getconf CLK_TCK)

step "1 GiB preallocated, written file (reads must hit real data, not holes)"
file=$W/peer.raw
fio --name=fill --filename="$file" --rw=write --bs=1M --size=1G --ioengine=io_uring --direct=1 \
  --iodepth=8 --refill_buffers --output=/dev/null || die "fill failed"
sync

daemon_start -- "${DP_EXTRA[@]}"
vol_create bench 1Gi
nbdcopy "$file" "$(nbd_uri bench)" || die "nbdcopy into the datapathd volume failed"

declare -A PID
PID[datapathd]=$DAEMON_PID
bg qemu-nbd --socket="$W/qemu.sock" --format=raw --cache=none --aio=io_uring -x bench \
  --persistent --shared=8 "$file" 2>>"$W/qemu.log"
PID[qemu-nbd]=$BG_PID
# The fair nbdkit: cache=none keeps it out of the page cache like the others (nbdkit >= 1.22).
bg nbdkit -f -U "$W/kfile.sock" --exportname=bench file "$file" cache=none 2>>"$W/kfile.log"
PID[nbdkit-file]=$BG_PID
# nbdkit's defaults: reads and writes go through the host page cache (not a peer for ratios).
bg nbdkit -f -U "$W/kfilepc.sock" --exportname=bench file "$file" 2>>"$W/kfilepc.log"
PID[nbdkit-file-pagecache]=$BG_PID
bg nbdkit -f -U "$W/kmem.sock" --exportname=bench memory 1G 2>>"$W/kmem.log"
PID[nbdkit-memory]=$BG_PID
wait_for 10 test -S "$W/qemu.sock" -a -S "$W/kfile.sock" -a -S "$W/kfilepc.sock" \
  -a -S "$W/kmem.sock" || die "peers did not start"
# The memory server is written once so that reads return stored data, like everyone else.
nbdcopy "$file" "nbd+unix:///bench?socket=$W/kmem.sock" || die "filling nbdkit memory failed"

engine_args() {  # TARGET -> fio options selecting it
  case $1 in
    raw) echo "--ioengine=io_uring --direct=1 --filename=$file" ;;
    datapathd) echo "--ioengine=nbd --uri=$(nbd_uri bench)" ;;
    qemu-nbd) echo "--ioengine=nbd --uri=nbd+unix:///bench?socket=$W/qemu.sock" ;;
    nbdkit-file) echo "--ioengine=nbd --uri=nbd+unix:///bench?socket=$W/kfile.sock" ;;
    nbdkit-file-pagecache) echo "--ioengine=nbd --uri=nbd+unix:///bench?socket=$W/kfilepc.sock" ;;
    nbdkit-memory) echo "--ioengine=nbd --uri=nbd+unix:///bench?socket=$W/kmem.sock" ;;
    *) die "unknown target $1" ;;
  esac
}
workload_args() {
  case $1 in
    randread32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    randwrite32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    # Four fio jobs, each its own NBD connection (or its own ring on raw), QD32 each.
    randread4x32) echo "--rw=randread --bs=4k --iodepth=32 --numjobs=4 --group_reporting" ;;
    randwrite4x32) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=4 --group_reporting" ;;
    qd1) echo "--rw=randread --bs=4k --iodepth=1 --lat_percentiles=1" ;;
    seqread) echo "--rw=read --bs=1M --iodepth=8" ;;
    seqwrite) echo "--rw=write --bs=1M --iodepth=8" ;;
    *) die "unknown workload $1" ;;
  esac
}

results=$W/results.tsv
: >"$results"
for wl in $WORKLOADS; do
  for t in $TARGETS; do
    out=$W/fio.$wl.$t.json
    pid=${PID[$t]:-}
    # shellcheck disable=SC2046
    fio --name="$wl" $(engine_args "$t") $(workload_args "$wl") --size=1G --time_based \
      --runtime="$RUNTIME" --ramp_time="$RAMP" --output-format=json --output="$out" >/dev/null &
    fio_pid=$!
    # fio counts I/Os after its ramp: the server's CPU is sampled over the same window, from
    # the ramp's end (fio start-up, a few ms, is the error) to fio's exit.
    c0=; c1=
    if [ -n "$pid" ]; then sleep "$RAMP"; c0=$(cpu_ticks "$pid"); fi
    wait "$fio_pid" || die "fio $wl on $t failed"
    [ -n "$pid" ] && c1=$(cpu_ticks "$pid")
    cpu_s=-
    [ -n "$pid" ] && cpu_s=$(awk -v a="$c0" -v b="$c1" -v hz="$HZ" 'BEGIN { printf "%.3f", (b - a) / hz }')
    dir=read; case $wl in *write*) dir=write ;; esac
    jq -r --arg wl "$wl" --arg t "$t" --arg d "$dir" --arg cpu "$cpu_s" \
      '.jobs[0][$d] | [$wl, $t, .iops, .bw_bytes, .lat_ns.mean / 1000,
        ((.lat_ns.percentile // {})["99.000000"] // 0) / 1000, .total_ios, $cpu] | @tsv' \
      "$out" >>"$results"
    step "$wl on $t: $(tail -1 "$results" | cut -f3- | awk '{ printf "%.0f IOPS, %.1f MiB/s, mean %.1f us, p99 %.1f us, %d I/Os, server CPU %s s", $1, $2 / 1048576, $3, $4, $5, $6 }')"
  done
done
daemon_stop

"$PY" - "$results" "$RUNTIME" "$RAMP" <<'PY'
import sys, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    wl, t, iops, bw, lat, p99, ios, cpu = line.rstrip("\n").split("\t")
    cpu_per_mio = None
    if cpu != "-" and float(ios) > 0:
        cpu_per_mio = float(cpu) / (float(ios) / 1e6)
    rows[wl][t] = dict(iops=float(iops), mib=float(bw) / 1048576, lat=float(lat), p99=float(p99),
                       cpu=cpu_per_mio)
cols = ["raw", "datapathd", "qemu-nbd", "nbdkit-file", "nbdkit-file-pagecache", "nbdkit-memory"]
PEERS = ("qemu-nbd", "nbdkit-file")  # the page-cache nbdkit is shown, never a peer for ratios
order = ["randread32", "randwrite32", "randread4x32", "randwrite4x32", "qd1", "qd1p99",
         "seqread", "seqwrite"]
names = {"randread32": "4k randread QD32 (IOPS)", "randwrite32": "4k randwrite QD32 (IOPS)",
         "randread4x32": "4k randread 4 conns x QD32 (IOPS)",
         "randwrite4x32": "4k randwrite 4 conns x QD32 (IOPS)",
         "qd1": "4k randread QD1 mean lat (us)", "qd1p99": "4k randread QD1 p99 lat (us)",
         "seqread": "1M seq read QD8 (MiB/s)", "seqwrite": "1M seq write QD8 (MiB/s)"}
def val(wl, t):
    src = "qd1" if wl == "qd1p99" else wl
    r = rows.get(src, {}).get(t)
    if r is None: return None
    if wl == "qd1": return r["lat"]
    if wl == "qd1p99": return r["p99"] or None
    return r["mib"] if wl.startswith("seq") else r["iops"]
def fmt(v, wl):
    if v is None: return "-"
    return f"{v:.1f}" if wl.startswith("qd1") else f"{v:.0f}"
def mark(ok): return "PASS" if ok else "MISS"
print(f"runtime {sys.argv[2]} s, ramp {sys.argv[3]} s per cell; peers for the ratios: "
      "qemu-nbd and nbdkit-file (both cache=none)\n")
print("| workload | " + " | ".join(cols) + " | dp / raw | dp / best peer | targets |")
print("|---" * (len(cols) + 4) + "|")
for wl in order:
    if (wl if wl != "qd1p99" else "qd1") not in rows: continue
    v = {t: val(wl, t) for t in cols}
    dp, raw, mem = v["datapathd"], v["raw"], v["nbdkit-memory"]
    peers = [v[p] for p in PEERS if v[p]]
    r_raw = r_peer = "-"
    targets = []
    if dp is not None:
        if wl.startswith("qd1"):
            if peers: r_peer = f"{dp / min(peers):.2f} (lower is better)"
            if raw:
                r_raw = f"{dp - raw:+.1f} us"
                if wl == "qd1": targets.append(f"mean <= raw + 12 us: {mark(dp - raw <= 12)}")
        else:
            if raw: r_raw = f"{dp / raw:.2f}"
            if peers: r_peer = f"{dp / max(peers):.2f}"
            if wl in ("randread32", "randwrite32"):
                if raw: targets.append(f">= 90% raw: {mark(dp / raw >= 0.9)}")
                if peers: targets.append(f">= 1.25x best peer: {mark(dp / max(peers) >= 1.25)}")
            elif wl in ("randread4x32", "randwrite4x32"):
                if raw: targets.append(f">= 95% raw: {mark(dp / raw >= 0.95)}")
            elif wl.startswith("seq") and raw and mem:
                q = dp / min(raw, mem)
                targets.append(f">= 95% min(raw, mem) ({q:.2f}): {mark(q >= 0.95)}")
    print(f"| {names[wl]} | " + " | ".join(fmt(v[t], wl) for t in cols) +
          f" | {r_raw} | {r_peer} | {'; '.join(targets) or '-'} |")

print("\nServer CPU time (user+sys, all threads, /proc/PID/stat) per million I/Os, seconds; "
      "raw has no server\n")
print("| workload | " + " | ".join(cols) + " | dp / best peer | target |")
print("|---" * (len(cols) + 3) + "|")
for wl in order:
    if wl not in rows or wl == "qd1p99": continue
    c = {t: rows[wl].get(t, {}).get("cpu") for t in cols}
    dp = c["datapathd"]
    peers = [c[p] for p in PEERS if c[p]]
    ratio = target = "-"
    if dp is not None and peers:
        q = dp / min(peers); ratio = f"{q:.2f}"
        if wl in ("randread32", "randwrite32", "randread4x32", "randwrite4x32", "qd1"):
            target = f"<= 0.7x best peer: {mark(q <= 0.7)}"
    print(f"| {names[wl].split(' (')[0]} | " +
          " | ".join("-" if c[t] is None else f"{c[t]:.2f}" for t in cols) +
          f" | {ratio} | {target} |")
PY
