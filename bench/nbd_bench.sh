#!/usr/bin/env bash
# Compares, in one run and on one disk, nbd-datapathd with the NBD servers people would otherwise
# use, with the raw file underneath, and with an in-memory NBD server (the transport ceiling).
# Prints a Markdown table (docs/benchmarks.md explains the columns). Not a CTest test.
#
#   bench/nbd_bench.sh                 RUNTIME=10 RAMP=2 BENCH_DIR=/var/tmp NBDCSI_BIN=build/bin
#   WORKLOADS="randread32 qd1" TARGETS="raw datapathd" bench/nbd_bench.sh   (a subset)
. "$(dirname "$0")/../test/integration/lib.sh"
need fio nbdkit qemu-nbd nbdcopy jq
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
WORKLOADS=${WORKLOADS:-randread32 randwrite32 qd1 seqread seqwrite}
TARGETS=${TARGETS:-raw datapathd qemu-nbd nbdkit-file nbdkit-memory}
NBDCSI_SERVER=datapathd
# The data must live on the disk being measured, not on a tmpfs /tmp.
NBDCSI_WORKDIR_BASE=${BENCH_DIR:-/var/tmp}
lib_init

step "1 GiB preallocated, written file (reads must hit real data, not holes)"
file=$W/peer.raw
fio --name=fill --filename="$file" --rw=write --bs=1M --size=1G --ioengine=io_uring --direct=1 \
  --iodepth=8 --refill_buffers --output=/dev/null || die "fill failed"
sync

daemon_start
vol_create bench 1Gi
nbdcopy "$file" "$(nbd_uri bench)" || die "nbdcopy into the datapathd volume failed"

bg qemu-nbd --socket="$W/qemu.sock" --format=raw --cache=none --aio=io_uring -x bench \
  --persistent --shared=8 "$file" 2>>"$W/qemu.log"
bg nbdkit -f -U "$W/kfile.sock" --exportname=bench file "$file" 2>>"$W/kfile.log"
bg nbdkit -f -U "$W/kmem.sock" --exportname=bench memory 1G 2>>"$W/kmem.log"
wait_for 10 test -S "$W/qemu.sock" -a -S "$W/kfile.sock" -a -S "$W/kmem.sock" || die "peers did not start"
# The memory server is written once so that reads return stored data, like everyone else.
nbdcopy "$file" "nbd+unix:///bench?socket=$W/kmem.sock" || die "filling nbdkit memory failed"

engine_args() {  # TARGET -> fio options selecting it
  case $1 in
    raw) echo "--ioengine=io_uring --direct=1 --filename=$file" ;;
    datapathd) echo "--ioengine=nbd --uri=$(nbd_uri bench)" ;;
    qemu-nbd) echo "--ioengine=nbd --uri=nbd+unix:///bench?socket=$W/qemu.sock" ;;
    nbdkit-file) echo "--ioengine=nbd --uri=nbd+unix:///bench?socket=$W/kfile.sock" ;;
    nbdkit-memory) echo "--ioengine=nbd --uri=nbd+unix:///bench?socket=$W/kmem.sock" ;;
  esac
}
workload_args() {
  case $1 in
    randread32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    randwrite32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
    seqread) echo "--rw=read --bs=1M --iodepth=8" ;;
    seqwrite) echo "--rw=write --bs=1M --iodepth=8" ;;
  esac
}

results=$W/results.tsv
: >"$results"
for wl in $WORKLOADS; do
  for t in $TARGETS; do
    out=$W/fio.$wl.$t.json
    # shellcheck disable=SC2046
    fio --name="$wl" $(engine_args "$t") $(workload_args "$wl") --size=1G --time_based \
      --runtime="$RUNTIME" --ramp_time="$RAMP" --output-format=json --output="$out" >/dev/null ||
      die "fio $wl on $t failed"
    dir=read; case $wl in *write*) dir=write ;; esac
    jq -r --arg wl "$wl" --arg t "$t" --arg d "$dir" \
      '.jobs[0][$d] | [$wl, $t, .iops, .bw_bytes, .lat_ns.mean / 1000] | @tsv' "$out" >>"$results"
    step "$wl on $t: $(tail -1 "$results" | cut -f3- | awk '{ printf "%.0f IOPS, %.1f MiB/s, %.1f us", $1, $2 / 1048576, $3 }')"
  done
done
daemon_stop

"$PY" - "$results" "$RUNTIME" "$RAMP" <<'PY'
import sys, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    wl, t, iops, bw, lat = line.split("\t")
    rows[wl][t] = (float(iops), float(bw) / 1048576, float(lat))
cols = ["raw", "datapathd", "qemu-nbd", "nbdkit-file", "nbdkit-memory"]
names = {"randread32": "4k randread QD32 (IOPS)", "randwrite32": "4k randwrite QD32 (IOPS)",
         "qd1": "4k randread QD1 (mean lat, us)", "seqread": "1M seq read QD8 (MiB/s)",
         "seqwrite": "1M seq write QD8 (MiB/s)"}
def val(wl, t):
    r = rows[wl].get(t)
    if r is None: return None
    return r[2] if wl == "qd1" else (r[1] if wl.startswith("seq") else r[0])
def fmt(v, wl):
    if v is None: return "-"
    return f"{v:.1f}" if wl == "qd1" else f"{v:.0f}"
def mark(ok): return "PASS" if ok else "MISS"
print(f"runtime {sys.argv[2]} s, ramp {sys.argv[3]} s per cell\n")
print("| workload | " + " | ".join(cols) + " | dp / best peer | dp / raw | dp / min(raw, mem) | QD1 delta vs raw (us) | targets |")
print("|---" * (len(cols) + 6) + "|")
for wl in ["randread32", "randwrite32", "qd1", "seqread", "seqwrite"]:
    if wl not in rows: continue
    v = {t: val(wl, t) for t in cols}
    dp, raw, mem = v["datapathd"], v["raw"], v["nbdkit-memory"]
    peers = [x for x in (v["qemu-nbd"], v["nbdkit-file"]) if x]
    r_peer = r_raw = r_min = delta = "-"
    targets = []
    if dp is not None:
        if wl == "qd1":
            if peers: r_peer = f"{dp / min(peers):.2f} (latency, lower is better)"
            if raw: delta = f"{dp - raw:+.1f}"; targets.append(f"QD1 within 25 us of raw: {mark(dp - raw <= 25)}")
        else:
            if peers:
                q = dp / max(peers); r_peer = f"{q:.2f}"
                if wl in ("randread32", "randwrite32"): targets.append(f">=1.3x peer: {mark(q >= 1.3)}")
            if raw:
                q = dp / raw; r_raw = f"{q:.2f}"
                if wl == "randread32": targets.append(f">=85% raw: {mark(q >= 0.85)}")
            if wl.startswith("seq") and raw and mem:
                q = dp / min(raw, mem); r_min = f"{q:.2f}"
                targets.append(f">=90% min(raw, mem): {mark(q >= 0.9)}")
    print(f"| {names[wl]} | " + " | ".join(fmt(v[t], wl) for t in cols) +
          f" | {r_peer} | {r_raw} | {r_min} | {delta} | {'; '.join(targets) or '-'} |")
PY
