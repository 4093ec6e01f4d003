#!/usr/bin/env bash
# Disk faults under nbd-datapathd: faults_disk.sh [full|meta|data] (default: all three).
#
#   full  The pool's file system fills up (a 64 MiB tmpfs, 64x overcommitted) while four
#         independent NBD clients write: nbdcopy, qemu-io, fio's nbd engine and nbdsh each see
#         ENOSPC (their own error, non-zero exit), never EIO and never a hang. A neighbour volume
#         keeps reading and overwriting its allocated blocks the whole time with zero errors and
#         every read verified; metadata changes and new volumes on the full disk either succeed
#         whole or fail with a clear error and leave no file behind; once space is freed, writes
#         and creates work again; after a restart every volume is there with its data.
#         (proto_fulldisk.sh covers one libnbd writer's ENOSPC and stream sync; this adds the
#         other clients, the neighbour and the control plane on a full disk.)
#   meta  Metadata files damaged while the daemon is down: garbage, cut in half, empty, a wrong
#         version, a wrong size type, a name that is not the file's, and a snapshot's cut in
#         half. The daemon starts; `pool info` and `volume inspect` / `snapshot inspect` name
#         each broken object and why; the healthy volumes are served over NBD with their data;
#         the broken names stay taken; no file in the pool is deleted or changed (checksums),
#         across two restarts; an explicit delete removes a broken volume.
#   data  Backing files gone or damaged: a volume's data file removed, a snapshot's data file
#         removed, a volume's data file truncated short of its metadata, all while the daemon is
#         down; and a data file removed while the daemon runs and serves it. Each is fenced with
#         a reason, the others are served, nothing is deleted or changed: a short data file is
#         not zero-extended (its end is lost, zeroes there would pass for data), and once a
#         served data file is removed no FLUSH succeeds (writes into the nameless inode are lost
#         when the daemon stops).
. "$(dirname "$0")/lib.sh"
is_datapathd || skip "disk faults are about nbd-datapathd's pool"
"$PY" -c 'import nbd' 2>/dev/null || skip "needs python3-libnbd for $PY"
need jq sha256sum
lib_init
PARTS=${1:-full,meta,data}
SKIPPED=()

ndjson() { nbdctl -o json "$@"; }
broken_reason() {  # broken_reason NAME [snapshot/]: the reason pool info gives, or ""
  ndjson pool info | jq -r --arg p "$1: " '.broken_volumes[]? | select(startswith($p)) | ltrimstr($p)'
}
# Checksums of every file under the pool (names, sizes, contents), for "nothing changed".
pool_sums() { (cd "$1" && find . -type f ! -name .pool.lock -print0 | sort -z | xargs -0 -r sha256sum); }
# check_inspect KIND NAME WORD: inspect must fail and its message name the object and WORD.
check_inspect() {
  local out rc=0
  out=$(nbdctl "$1" inspect "$2" 2>&1) || rc=$?
  [ $rc != 0 ] || { echo "$1 inspect $2 succeeded on a broken object: $out" >&2; return 1; }
  grep -q "$2" <<<"$out" && grep -qi "$3" <<<"$out" ||
    { echo "$1 inspect $2 does not say why ($3): $out" >&2; return 1; }
}
# nbd_refused NAME: a client cannot open the export.
nbd_refused() { ! nbdinfo --size "$(nbd_uri "$1")" >/dev/null 2>&1; }
# verify NAME FILE: the volume starts with FILE's bytes.
verify() {
  URI=$(nbd_uri "$1") F=$2 "$PY" - <<'PY'
import os, nbd
h = nbd.NBD(); h.connect_uri(os.environ["URI"])
want = open(os.environ["F"], "rb").read()
assert h.pread(len(want), 0) == want, "data differs"
h.shutdown()
PY
}
engine_log_clean() {
  ! grep -E 'engine invariant violated|stale completions dropped|AddressSanitizer|runtime error:' "$W/datapathd.log"
}

# ---------------------------------------------------------------------------------------------
part_full() {
  need nbdcopy qemu-io fio nbdsh
  fio --enghelp 2>/dev/null | grep -qw nbd || skip "this fio has no nbd engine"
  local pool=$W/tiny
  mkdir -p "$pool"
  if ! mount -t tmpfs -o size=64M,mode=0700 nbdcsi-faults-full "$pool" 2>/dev/null; then
    echo "SKIP part full: cannot mount a tmpfs (not privileged)" >&2
    SKIPPED+=(full)
    return 0
  fi
  on_exit "umount '$pool' || umount -l '$pool'"
  daemon_start "$pool" -- --overcommit 64 --workers 1
  vol_create big 1Gi
  vol_create big2 1Gi
  vol_create nb 256Mi
  head -c $((4 << 20)) /dev/urandom >"$W/nb.bin"
  nbdcopy "$W/nb.bin" "$(nbd_uri nb)" || die "nbdcopy into nb"

  # The neighbour: reads its 4 MiB and overwrites blocks inside it (allocated: no new space
  # needed), verifying every read against its own copy, until told to stop.
  URI=$(nbd_uri nb) F=$W/nb.bin STOP=$W/nb.stop OUT=$W/nb.out "$PY" - <<'PY' &
import os, random, nbd, time
h = nbd.NBD(); h.connect_uri(os.environ["URI"])
ref = bytearray(open(os.environ["F"], "rb").read())
rnd = random.Random(5)
reads = writes = errors = 0
first_err = ""
while not os.path.exists(os.environ["STOP"]):
    off = rnd.randrange(len(ref) // 4096) * 4096
    try:
        if rnd.random() < 0.5:
            blk = os.urandom(4096)
            h.pwrite(blk, off)
            ref[off:off + 4096] = blk
            writes += 1
        else:
            n = 65536 if off + 65536 <= len(ref) else 4096
            if h.pread(n, off) != bytes(ref[off:off + n]):
                raise AssertionError(f"read at {off} differs")
            reads += 1
    except Exception as e:
        errors += 1
        first_err = first_err or repr(e)
h.flush()
ok = h.pread(len(ref), 0) == bytes(ref)
h.shutdown()
open(os.environ["F"], "wb").write(ref)  # what the volume must hold from now on
open(os.environ["OUT"], "w").write(f"{reads} {writes} {errors} {int(ok)} {first_err}\n")
PY
  local nbpid=$!
  LIB_PIDS+=("$nbpid")

  head -c $((96 << 20)) /dev/urandom >"$W/fill.bin"
  local out rc enospc=0
  step "fill: nbdcopy 96 MiB into a 64 MiB pool"
  rc=0; out=$(timeout 120 nbdcopy "$W/fill.bin" "$(nbd_uri big)" 2>&1) || rc=$?
  [ $rc != 0 ] || die "nbdcopy wrote 96 MiB into a 64 MiB pool"
  [ $rc != 124 ] || die "nbdcopy hung on a full pool"
  grep -qi 'no space left' <<<"$out" || die "nbdcopy failed without ENOSPC: $out"
  enospc=$((enospc + 1)); echo "  nbdcopy: exit $rc: $(grep -i 'no space' <<<"$out" | head -1)"

  step "fill: qemu-io, fio, nbdsh on a full pool"
  rc=0; out=$(timeout 60 qemu-io -f raw "$(nbd_uri big2)" -c 'write -P 0x5a 0 32M' 2>&1) || rc=$?
  [ $rc != 124 ] || die "qemu-io hung on a full pool"
  grep -qi 'no space left' <<<"$out" || die "qemu-io did not see ENOSPC: $out"
  enospc=$((enospc + 1)); echo "  qemu-io: $(grep -i 'no space' <<<"$out" | head -1)"
  rc=0
  timeout 60 fio --name=fill --ioengine=nbd --uri="$(nbd_uri big2)" --rw=write --bs=1M \
    --offset=256M --size=32M --output-format=json --output="$W/fio.json" >/dev/null 2>&1 || rc=$?
  [ $rc != 124 ] || die "fio hung on a full pool"
  [ "$(jq '.jobs[0].error' "$W/fio.json")" = 28 ] ||
    die "fio's error is $(jq '.jobs[0].error' "$W/fio.json"), want 28 (ENOSPC)"
  enospc=$((enospc + 1)); echo "  fio: exit $rc, job error 28 (ENOSPC)"
  rc=0; out=$(timeout 60 nbdsh -u "$(nbd_uri big)" -c 'h.pwrite(b"\xa5" * 1048576, 900 << 20)' 2>&1) || rc=$?
  grep -qi 'no space left' <<<"$out" || die "nbdsh did not see ENOSPC: $out"
  enospc=$((enospc + 1)); echo "  nbdsh: $(grep -i 'no space' <<<"$out" | head -1)"

  step "control plane on the full disk"
  ndjson pool info >"$W/info.json"
  echo "  pool free $(jq .free_bytes "$W/info.json") bytes"
  local created=0
  if nbdctl volume create new1 --size 64Mi >"$W/new1.out" 2>&1; then
    created=1
  else
    grep -qiE 'space|ENOSPC|exhausted' "$W/new1.out" || die "volume create on a full disk failed without saying why: $(cat "$W/new1.out")"
    [ -z "$(ls -A "$pool/volumes" | grep -E '(^|\.)new1\.')" ] || die "a failed create left files: $(ls -A "$pool/volumes")"
  fi
  echo "  volume create on the full disk: $([ $created = 1 ] && echo created || echo "refused: $(tail -1 "$W/new1.out")")"
  # Persisted first, then applied: a refused change must not be in force either.
  local want_iops=100000
  if ! nbdctl volume qos nb --max-iops 100000 >"$W/qos.out" 2>&1; then
    echo "  volume qos on the full disk: refused: $(tail -1 "$W/qos.out")"
    want_iops=0
  fi
  [ "$(ndjson volume inspect nb | jq .qos.max_iops)" = $want_iops ] ||
    die "nb's QoS in force is not what the answer said (want max_iops $want_iops)"
  rc=0; nbdctl snapshot create snfull --volume nb --wait >"$W/snap.out" 2>&1 || rc=$?
  echo "  snapshot on the full disk: $([ $rc = 0 ] && echo made || echo "refused: $(tail -1 "$W/snap.out")")"
  daemon_alive || die "the daemon died on a full disk"

  step "free space (TRIM big and big2), then write and create again"
  nbdsh -u "$(nbd_uri big)" -c 'h.trim(h.get_size(), 0); h.flush()' || die "trim big"
  nbdsh -u "$(nbd_uri big2)" -c 'h.trim(h.get_size(), 0); h.flush()' || die "trim big2"
  touch "$W/nb.stop"
  wait "$nbpid" || die "the neighbour process failed"
  read -r nreads nwrites nerrors nok nfirst <"$W/nb.out"
  echo "  neighbour during the fill: $nreads reads verified, $nwrites overwrites, $nerrors errors"
  [ "$nerrors" = 0 ] || die "the neighbour saw $nerrors errors: $nfirst"
  [ "$nok" = 1 ] || die "the neighbour's data differs at the end"
  [ "$nreads" -ge 20 ] && [ "$nwrites" -ge 20 ] || die "the neighbour did too little to mean anything"
  qemu-io -f raw "$(nbd_uri big2)" -c 'write -P 0x5a 0 8M' -c 'read -P 0x5a 0 8M' >/dev/null ||
    die "writes still fail after space was freed"
  [ $created = 1 ] || nbdctl volume create new1 --size 64Mi >/dev/null || die "create still fails after space was freed"

  step "restart: every volume, its metadata and the neighbour's data"
  daemon_stop
  daemon_start "$pool" -- --overcommit 64 --workers 1
  ndjson pool info >"$W/info.json"
  [ "$(jq '.broken_volumes | length' "$W/info.json")" = 0 ] || die "broken after a full disk: $(jq -c .broken_volumes "$W/info.json")"
  for v in big big2 nb new1; do nbdctl volume inspect "$v" >/dev/null || die "volume $v lost"; done
  [ "$(ndjson volume inspect nb | jq .qos.max_iops)" = $want_iops ] || die "nb's QoS changed across the restart"
  verify nb "$W/nb.bin" || die "the neighbour's data changed across the restart"
  engine_log_clean || die "engine errors in the log"
  daemon_stop
  echo "full: $enospc clients saw ENOSPC; neighbour $nreads verified reads, $nwrites overwrites, 0 errors"
}

# ---------------------------------------------------------------------------------------------
# Writes 1 MiB of random data to a new volume; its copy goes to $W/data.NAME.
make_vol() {
  vol_create "$1" "${2:-16Mi}"
  head -c $((1 << 20)) /dev/urandom >"$W/data.$1"
  nbdcopy "$W/data.$1" "$(nbd_uri "$1")" || die "cannot write $1"
}

part_meta() {
  need nbdcopy nbdinfo
  local pool=$W/pool-meta
  daemon_start "$pool"
  for v in good1 good2 garbage half empty version sizetype othername; do make_vol "$v"; done
  nbdctl snapshot create snaphalf --volume good1 --wait >/dev/null || die "snapshot"
  nbdctl snapshot create snapok --volume good2 --wait >/dev/null || die "snapshot"
  daemon_stop
  local d=$pool/volumes
  printf '{not json at all\x00\xff' >"$d/garbage.json"
  truncate -s $(( $(stat -c %s "$d/half.json") / 2 )) "$d/half.json"
  : >"$d/empty.json"
  jq '.version = 999' "$d/version.json" >"$W/v.json" && cat "$W/v.json" >"$d/version.json"
  jq '.size = "a lot"' "$d/sizetype.json" >"$W/s.json" && cat "$W/s.json" >"$d/sizetype.json"
  jq '.name = "someone-else"' "$d/othername.json" >"$W/o.json" && cat "$W/o.json" >"$d/othername.json"
  truncate -s $(( $(stat -c %s "$pool/snapshots/snaphalf.json") / 2 )) "$pool/snapshots/snaphalf.json"
  sync
  pool_sums "$pool" >"$W/sums.before"
  local bad=(garbage half empty version sizetype othername) v
  for round in 1 2; do
    daemon_start "$pool"
    step "meta, start $round: broken objects fenced, the rest served"
    for v in "${bad[@]}"; do
      local why; why=$(broken_reason "$v")
      [ -n "$why" ] || die "pool info does not list $v as broken: $(ndjson pool info | jq -c .broken_volumes)"
      [ "$round" = 2 ] || echo "  $v: $why"
      check_inspect volume "$v" broken || die "volume inspect $v"
      nbd_refused "$v" || die "an NBD client opened broken volume $v"
      rc=0; out=$(nbdctl volume create "$v" --size 16Mi 2>&1) || rc=$?
      [ $rc != 0 ] && grep -qi broken <<<"$out" || die "create over broken $v: $out"
    done
    why=$(broken_reason snapshot/snaphalf)
    [ -n "$why" ] || die "pool info does not list snapshot snaphalf as broken"
    [ "$round" = 2 ] || echo "  snapshot/snaphalf: $why"
    check_inspect snapshot snaphalf broken || die "snapshot inspect snaphalf"
    [ "$(ndjson volume list | jq -r '[.volumes[].name] | sort | join(",")')" = good1,good2 ] ||
      die "volume list: $(ndjson volume list | jq -c '[.volumes[].name]')"
    for v in good1 good2; do verify "$v" "$W/data.$v" || die "$v's data"; done
    nbdctl snapshot inspect snapok >/dev/null || die "healthy snapshot snapok lost"
    # Other work on the pool must not touch the broken files either.
    nbdctl volume create "extra$round" --size 16Mi >/dev/null || die "create next to broken volumes"
    nbdctl volume delete "extra$round" >/dev/null || die "delete next to broken volumes"
    daemon_stop
    pool_sums "$pool" >"$W/sums.after"
    diff "$W/sums.before" "$W/sums.after" >&2 || die "files in the pool changed or vanished (start $round)"
  done
  daemon_start "$pool"
  nbdctl volume delete garbage >/dev/null || die "an explicit delete of a broken volume failed"
  [ ! -e "$d/garbage.json" ] && [ ! -e "$d/garbage.img" ] || die "delete left garbage's files"
  [ -z "$(broken_reason garbage)" ] || die "garbage still listed broken after its delete"
  nbdctl volume create garbage --size 16Mi >/dev/null || die "the name is not free after the delete"
  engine_log_clean || die "engine errors in the log"
  daemon_stop
  echo "meta: ${#bad[@]} volumes and 1 snapshot fenced with a reason over 2 starts, 2 healthy volumes served, 0 files changed"
}

# ---------------------------------------------------------------------------------------------
part_data() {
  need nbdcopy nbdinfo
  local pool=$W/pool-data bugs=0 short_bug=0
  daemon_start "$pool"
  for v in good1 good2 gone short live; do make_vol "$v"; done
  nbdctl snapshot create snapgone --volume good1 --wait >/dev/null || die "snapshot"
  daemon_stop
  local d=$pool/volumes
  rm "$d/gone.img" "$pool/snapshots/snapgone.img"
  truncate -s $((512 << 10)) "$d/short.img"   # 16 MiB volume, half of its written MiB gone
  sync
  pool_sums "$pool" >"$W/sums.before"
  daemon_start "$pool"
  step "data: missing and short data files"
  local why
  why=$(broken_reason gone)
  [ -n "$why" ] && grep -qi missing <<<"$why" || die "gone not fenced as missing: '$why'"
  echo "  gone: $why"
  check_inspect volume gone missing || die "volume inspect gone"
  nbd_refused gone || die "an NBD client opened gone"
  why=$(broken_reason snapshot/snapgone)
  [ -n "$why" ] || die "snapshot snapgone not fenced"
  echo "  snapshot/snapgone: $why"
  for v in good1 good2 live; do verify "$v" "$W/data.$v" || die "$v's data"; done

  why=$(broken_reason short)
  if [ -z "$why" ]; then
    echo "  NOT FENCED: short.img (512 KiB, metadata 16 MiB): the pool zero-extended it at start" >&2
    echo "            size now $(stat -c %s "$d/short.img") bytes; the last 512 KiB of its data read as zeroes" >&2
    bugs=$((bugs + 1)) short_bug=1
  else
    echo "  short: $why"
    nbd_refused short || die "an NBD client opened short"
  fi

  step "data: a served volume's data file removed while the daemon runs"
  # The client goes on writing and flushing for 3 s after the removal. A FLUSH that succeeds
  # promises durability the removed file cannot give (the data dies at the next restart), so
  # fencing means: the volume is reported broken within those 3 s and, from then on, no more
  # FLUSH succeeds.
  URI=$(nbd_uri live) D="$d/live.img" OUT=$W/live.out "$PY" - <<'PY' &
import os, nbd, time
h = nbd.NBD(); h.connect_uri(os.environ["URI"])
h.pwrite(b"\x11" * 4096, 8 << 20); h.flush()
os.unlink(os.environ["D"])
t0 = time.monotonic()
results = []
while time.monotonic() - t0 < 3.0:
    try:
        h.pwrite(b"\x22" * 4096, (9 << 20) + len(results) * 4096)
        h.flush()
        results.append(1)
    except nbd.Error:
        results.append(0)
    time.sleep(0.1)
open(os.environ["OUT"], "w").write(f"{sum(results)} {len(results)} {results[-1]}\n")
try:
    h.shutdown()
except nbd.Error:
    pass
PY
  wait $! || die "the run-time removal client failed"
  local acked tries last why_live
  read -r acked tries last <"$W/live.out"
  why_live=$(broken_reason live)
  if [ -z "$why_live" ] || [ "$last" = 1 ]; then
    echo "  NOT FENCED: live.img removed at run time: $acked of $tries write+flush pairs over the next" \
         "3 s acknowledged (lost at the next restart), the last one $([ "$last" = 1 ] && echo acknowledged || echo refused)," \
         "reported broken: $([ -n "$why_live" ] && echo "yes ($why_live)" || echo no)" >&2
    bugs=$((bugs + 1))
  else
    echo "  live: fenced at run time ($acked of $tries flushes acknowledged before): $why_live"
    nbd_refused live || die "an NBD client opened live after its data file was removed"
  fi
  daemon_stop
  # Nothing the daemon found broken was deleted (live.img was removed by the test itself).
  # (short.img is left out if the pool rewrote it: that is reported above.)
  local skip=' ./volumes/live\.'
  [ "$short_bug" = 0 ] || skip="$skip| ./volumes/short\.img\$"
  grep -vE "$skip" "$W/sums.before" >"$W/sums.b2"
  pool_sums "$pool" | grep -vE "$skip" >"$W/sums.a2"
  diff "$W/sums.b2" "$W/sums.a2" >&2 || die "files in the pool changed or vanished"
  [ -e "$d/short.img" ] && [ -e "$d/short.json" ] && [ -e "$d/gone.json" ] || die "a damaged volume's file was deleted"
  engine_log_clean || die "engine errors in the log"
  [ $bugs = 0 ] || die "$bugs data-file faults not fenced (NOT FENCED above)"
  echo "data: missing volume and snapshot data files fenced with a reason, healthy volumes served, 0 files deleted"
}

for p in ${PARTS//,/ }; do
  case $p in
    full) part_full ;;
    meta) part_meta ;;
    data) part_data ;;
    *) die "unknown part $p (full, meta, data)" ;;
  esac
done
if [ ${#SKIPPED[@]} -gt 0 ]; then
  [ "${CI:-}" != true ] || die "parts skipped with CI=true: ${SKIPPED[*]}"
  [ "${#SKIPPED[@]}" -lt "$(wc -w <<<"${PARTS//,/ }")" ] || skip "every part skipped"
fi
step "PASS${SKIPPED:+ (skipped: ${SKIPPED[*]})}"
