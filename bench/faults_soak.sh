#!/usr/bin/env bash
# Soak (issue 12 part 4, case 4): VOLUMES volumes on one nbd-datapathd, each with its own NBD
# connection over the Unix socket (fio's nbd engine: one libnbd handle per job, one job per
# volume), all busy for MINUTES minutes with 4 KiB random writes that fio reads back and checks
# (crc32c, verify_backlog), rate-limited per volume so that latency means something on a small
# machine. Not a CTest test; bounded (fio's own runtime, and a timeout around it) and self-stopping.
#
#   bench/faults_soak.sh [--volumes 200] [--minutes 10] [--rate 10] [--depth 2] [--bin DIR]
#     --rate   write IOPS per volume (the verify reads come on top)
#
# Prints, per minute: operations per second, latency p50/p99/p99.9 of reads and writes (fio's
# completion latency, from the difference of its cumulative histograms between two status
# dumps), the daemon's RSS, open file descriptors and threads. Then memory growth after warm-up
# (RSS at minute 1 against the end), the fds back at the baseline once fio has gone, fio's error
# count (verification included) and the engine log check. Exit 0 only when fio saw no error,
# the connections all closed, the fd count is back and the log is clean.
. "$(dirname "$0")/../test/integration/lib.sh"
VOLUMES=200 MINUTES=10 RATE=10 DEPTH=2
while [ $# -gt 0 ]; do
  case $1 in
    --volumes) VOLUMES=$2; shift 2 ;;
    --minutes) MINUTES=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --depth) DEPTH=$2; shift 2 ;;
    --bin) NBDCSI_BIN=$2; shift 2 ;;
    *) echo "usage: $0 [--volumes N] [--minutes M] [--rate IOPS] [--depth QD] [--bin DIR]" >&2; exit 2 ;;
  esac
done
need fio jq
fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
lib_init
ulimit -n 8192 2>/dev/null || true
daemon_start
step "creating $VOLUMES volumes"
for i in $(seq "$VOLUMES"); do
  nbdctl volume create "soak$i" --size 16Mi >/dev/null || die "volume create soak$i"
done
pid_status() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
fds() { ls "/proc/$DAEMON_PID/fd" | wc -l; }
FDS0=$(fds) RSS0=$(pid_status "$DAEMON_PID" VmRSS)

{
  printf '[global]\nioengine=nbd\nthread=1\nrw=randwrite\nbs=4k\niodepth=%s\nsize=16m\n' "$DEPTH"
  printf 'verify=crc32c\nverify_backlog=64\nrate_iops=%s,%s\ntime_based=1\nruntime=%s\n' "$RATE" "$RATE" $((MINUTES * 60))
  printf 'randrepeat=0\ngroup_reporting=1\n'
  for i in $(seq "$VOLUMES"); do printf '[v%s]\nuri=%s\n' "$i" "$(nbd_uri "soak$i")"; done
} >"$W/soak.fio"

# The sampler: every 5 s the daemon's RSS (KiB), fds and threads, until fio is gone.
sampler() {
  local t0; t0=$(date +%s)
  while [ ! -e "$W/fio.done" ]; do
    echo "$(( $(date +%s) - t0 )) $(pid_status "$DAEMON_PID" VmRSS) $(fds) $(pid_status "$DAEMON_PID" Threads)" >>"$W/samples"
    sleep 5
  done
}
step "fio: $VOLUMES connections, $RATE write IOPS each + verify reads, QD $DEPTH, $MINUTES min"
bg sampler
rc=0
# --aux-path: fio saves its verify state files there, not in the caller's working directory.
timeout $((MINUTES * 60 + 300)) fio --aux-path="$W" --status-interval=60 --output-format=json+ --output="$W/fio.json" "$W/soak.fio" || rc=$?
touch "$W/fio.done"
daemon_alive || die "nbd-datapathd died during the soak"

"$PY" - "$W/fio.json" "$W/samples" "$RSS0" "$FDS0" <<'PY' || rc=1
import json, sys
path, samples_path, rss0, fds0 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text, docs, dec, i = open(path).read(), [], json.JSONDecoder(), 0
while True:
    j = text.find("{", i)
    if j < 0:
        break
    try:
        d, i = dec.raw_decode(text, j)
        docs.append(d)
    except json.JSONDecodeError:
        i = j + 1
samples = [tuple(map(int, l.split())) for l in open(samples_path) if len(l.split()) == 4]

def pct(bins, p):
    total = sum(bins.values())
    if total == 0:
        return 0.0
    want, seen = p / 100.0 * total, 0
    for ns in sorted(bins):
        seen += bins[ns]
        if seen >= want:
            return ns / 1000.0
    return max(bins) / 1000.0

def bins(job, d):
    return {int(k): v for k, v in job[d]["clat_ns"].get("bins", {}).items()}

def sample_at(t):
    best = None
    for s in samples:
        if s[0] <= t:
            best = s
    return best or samples[0]

print(f"{'min':>3} {'ops/s':>7} | {'read p50':>8} {'p99':>7} {'p99.9':>8} | {'write p50':>9} {'p99':>7} {'p99.9':>8} | {'RSS MiB':>7} {'fds':>5} {'thr':>4}   (latency in us)")
prev_t, prev = 0, {"read": {}, "write": {}, "ios": 0}
errors = 0
for d in docs:
    job = d["jobs"][0]
    t = job["elapsed"]
    cur = {"read": bins(job, "read"), "write": bins(job, "write"),
           "ios": job["read"]["total_ios"] + job["write"]["total_ios"]}
    errors = job["error"]
    if t <= prev_t:
        continue
    row = {}
    for dname in ("read", "write"):
        diff = {k: v - prev[dname].get(k, 0) for k, v in cur[dname].items()}
        row[dname] = [pct(diff, p) for p in (50, 99, 99.9)]
    ops = (cur["ios"] - prev["ios"]) / (t - prev_t)
    s = sample_at(t)
    print(f"{t / 60:>3.0f} {ops:>7.0f} | {row['read'][0]:>8.0f} {row['read'][1]:>7.0f} {row['read'][2]:>8.0f} | "
          f"{row['write'][0]:>9.0f} {row['write'][1]:>7.0f} {row['write'][2]:>8.0f} | {s[1] / 1024:>7.1f} {s[2]:>5} {s[3]:>4}")
    prev_t, prev = t, cur
last = docs[-1]["jobs"][0]
m1, end = sample_at(60), samples[-1]
print(f"RSS: {rss0 / 1024:.1f} MiB before fio, {m1[1] / 1024:.1f} MiB at 1 min, {end[1] / 1024:.1f} MiB at "
      f"{end[0] / 60:.1f} min: growth after warm-up {(end[1] - m1[1]) / 1024:+.1f} MiB; max "
      f"{max(s[1] for s in samples) / 1024:.1f} MiB")
print(f"fds: {fds0} before, {m1[2]} at 1 min, {end[2]} at the end; threads {m1[3]} -> {end[3]}")
print(f"fio: {last['write']['total_ios']} writes, {last['read']['total_ios']} verify reads, error {errors}")
sys.exit(1 if errors else 0)
PY
[ $rc = 0 ] || die "fio failed (exit $rc) or reported errors"

# Once fio has gone, every connection must be closed and the descriptors back at the baseline.
deadline=$(( $(date +%s) + 20 ))
until [ "$(nbdctl -o json volume list | jq '[.volumes[].open_connections] | add')" = 0 ] && [ "$(fds)" = "$FDS0" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || die "after fio: $(nbdctl -o json volume list | jq '[.volumes[].open_connections] | add') connections open, $(fds) fds (baseline $FDS0)"
  sleep 0.2
done
echo "after fio: 0 connections open, $(fds) fds (baseline $FDS0), RSS $(( $(pid_status "$DAEMON_PID" VmRSS) / 1024 )) MiB"
daemon_stop
if grep -E 'engine invariant violated|stale completions dropped' "$W/datapathd.log"; then
  die "the daemon log reports an engine error"
fi
step "soak PASS"
