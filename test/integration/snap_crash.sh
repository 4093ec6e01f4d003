#!/usr/bin/env bash
# The daemon dies in the middle of snapshot, restore and clone operations: snap_crash.sh xfs|ext4
# For every fault point named snapshot.* / restore.* / clone.* in common/fault.cpp that the
# pool's method reaches (reflink points on XFS, copy points on ext4, deletes on both), the
# daemon starts with NBDCSI_FAULT=<point>, nbdctl runs the operation, the daemon _exit(86)s,
# and after a restart without the fault the pool must hold the old state or the new one:
# nothing half-made that looks ready, only NAME.img/NAME.json pairs on disk, the file system's
# used space accounted for by those files, interrupted snapshot/clone copies reported as
# abandoned, and an interrupted restore resumed to the right content. (pool_crash_test covers
# every point in-process; this is the same matrix through the real daemon and CLI.)
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/snap_lib.sh"
FS=${1:?usage: snap_crash.sh xfs|ext4}
is_datapathd || skip "snapshots are an nbd-datapathd feature"
need nbdcopy
lib_init
snap_pool_mount "$FS"
BASE_USED=$(fs_used_bytes "$MNT")

# The fault points, straight from the source so that a new one is covered without editing this.
mapfile -t ALL_POINTS < <(grep -oE '^\s*"(snapshot|restore|clone)\.[a-z_]+"' "$NBDCSI_SRC/common/fault.cpp" | tr -d ' "')
[ "${#ALL_POINTS[@]}" -ge 10 ] || die "found only ${#ALL_POINTS[@]} snapshot fault points in common/fault.cpp"
POINTS=()
for p in "${ALL_POINTS[@]}"; do
  case $p in
    *.delete_meta) POINTS+=("$p") ;;
    *.copy_*) [ "$FS" = ext4 ] && POINTS+=("$p") ;;
    *) [ "$FS" = xfs ] && POINTS+=("$p") ;;
  esac
done
step "${#POINTS[@]} of ${#ALL_POINTS[@]} snapshot/restore/clone fault points apply to $FS: ${POINTS[*]}"

daemon_start "$POOL"
snap_assert_pool "$FS"
MI=$((1 << 20))
REF=$W/ref.raw
truncate -s $((64 * MI)) "$REF"
head -c $((12 * MI)) /dev/urandom | dd of="$REF" conv=notrunc status=none
head -c $((4 * MI)) /dev/urandom | dd of="$REF" bs=1M seek=50 conv=notrunc status=none
vol_create src 64Mi
nbdcopy "$REF" "$(nbd_uri src)" || die "nbdcopy into src"
snap_create base src
daemon_stop

# check POINT TARGET_KIND TARGET: the pool after a restart, against what the point allows.
check() {
  local point=$1 kind=$2 target=$3 expect
  case $point in
    *.copy_started|*.copy_done)
      case $kind in
        restore) expect=resumed ;;      # a snapshot never changes: the restore starts over
        *) expect=abandoned ;;           # the point in time died with the copy-before-write
      esac ;;
    *.meta_renamed) expect=either ;;    # the commit rename happened: new state (or old)
    *.delete_meta) expect=gone ;;
    *) expect=absent ;;                 # before the commit point: old state, files cleaned
  esac
  daemon_start "$POOL"
  nbdctl -o json pool info >"$W/info.json" || die "pool info after $point"
  if [ "$expect" = resumed ]; then
    wait_json_ready volume "$target" 60
  fi
  nbdctl -o json volume list >"$W/vols.json" || die "volume list after $point"
  nbdctl -o json snapshot list >"$W/snaps.json" || die "snapshot list after $point"
  "$PY" - "$POOL" "$W/info.json" "$W/vols.json" "$W/snaps.json" "$REF" "$kind" "$target" "$expect" \
      "$BASE_USED" "$MNT" <<'PYEOF' || die "pool inconsistent after fault point $point"
import json, os, sys
pool, info_f, vols_f, snaps_f, ref, kind, target, expect, base_used, mnt = sys.argv[1:]
info = json.load(open(info_f))
def listing(f, key):
    j = json.load(open(f))
    return j.get(key, []) if isinstance(j, dict) else j
vols = {v["name"]: v for v in listing(vols_f, "volumes")}
snaps = {s["name"]: s for s in listing(snaps_f, "snapshots")}
bad = []
ref_data = open(ref, "rb").read()

def same_as_ref(path):
    with open(path, "rb") as f:
        return f.read(len(ref_data)) == ref_data

# Every listed thing that says ready must be whole; nothing may be stuck half-made.
for n, s in snaps.items():
    if s.get("error"):
        bad.append(f"snapshot {n} failed: {s['error']}")
    elif not s.get("ready"):
        bad.append(f"snapshot {n} is not ready after restart (a copy without its point in time)")
    elif not same_as_ref(os.path.join(pool, "snapshots", n + ".img")):
        bad.append(f"snapshot {n} is ready but its data differs from the source's")
for n, v in vols.items():
    if not v.get("ready", True):
        bad.append(f"volume {n} is not ready after restart")
    elif not same_as_ref(os.path.join(pool, "volumes", n + ".img")):
        bad.append(f"volume {n} is ready but its data differs from the source's")
for must in ("src",):
    if must not in vols: bad.append("volume src is gone")
if "base" not in snaps: bad.append("snapshot base is gone")

present = target in (snaps if kind in ("snapshot", "delete") else vols)
abandoned = " ".join(info.get("abandoned_copies", []))
orphans = " ".join(info.get("cleaned_orphans", []))
if expect == "absent":
    if present: bad.append(f"{target} exists after a fault before its commit point")
    if target not in orphans: bad.append(f"{target}'s leftover files not reported in cleaned_orphans: {orphans!r}")
elif expect == "abandoned":
    if present: bad.append(f"{target} survived although its copy lost its point in time")
    if target not in abandoned: bad.append(f"{target} not reported in abandoned_copies: {abandoned!r}")
elif expect == "resumed":
    if not present: bad.append(f"restore {target} vanished instead of restarting its copy")
    if target in abandoned: bad.append(f"restore {target} reported abandoned; it should resume")
elif expect == "gone":
    if present: bad.append(f"{target} still listed after its metadata was removed")
if expect != "resumed" and target in abandoned and expect != "abandoned":
    bad.append(f"{target} unexpectedly in abandoned_copies")

# Exactly NAME.img + NAME.json per listed item; nothing else (temp files, orphans).
for sub, items in (("volumes", vols), ("snapshots", snaps)):
    want = {f"{n}.{e}" for n in items for e in ("img", "json")}
    have = set(os.listdir(os.path.join(pool, sub)))
    if have != want:
        bad.append(f"{sub}/: stray {sorted(have - want)}, missing {sorted(want - have)}")
    for n in items:
        img = os.path.join(pool, sub, n + ".img")
        if os.path.exists(img) and os.path.getsize(img) != items[n]["size_bytes"]:
            bad.append(f"{sub}/{n}.img is {os.path.getsize(img)} bytes, metadata says {items[n]['size_bytes']}")

# Space: what the file system uses beyond its empty state is accounted for by those files
# (reflinked extents are shared, so on XFS the files' sum may exceed the real use).
alloc = 0
for root, _, files in os.walk(mnt):
    for f in files:
        alloc += os.lstat(os.path.join(root, f)).st_blocks * 512
st = os.statvfs(mnt)
used = (st.f_blocks - st.f_bfree) * st.f_frsize - int(base_used)
slack = 24 << 20  # file system metadata: inodes, directories, extent trees, log growth
if used > alloc + slack:
    bad.append(f"file system uses {used >> 20} MiB more than when empty, files hold only {alloc >> 20} MiB: leaked space")
if not info.get("reflink") and used < alloc - slack:
    bad.append(f"files claim {alloc >> 20} MiB but the file system uses only {used >> 20} MiB")

for b in bad: print("  " + b, file=sys.stderr)
print(f"  {len(vols)} volumes, {len(snaps)} snapshots, used {used >> 20} MiB / files {alloc >> 20} MiB, "
      f"abandoned {abandoned!r}, orphans {orphans!r}", file=sys.stderr)
sys.exit(1 if bad else 0)
PYEOF
}

i=0
for point in "${POINTS[@]}"; do
  i=$((i + 1))
  kind=${point%%.*}
  case $point in
    snapshot.delete_meta)
      kind=delete; target=d${i}x
      daemon_start "$POOL"; snap_create "$target" src; daemon_stop
      cmd=(snapshot delete "$target") ;;
    snapshot.*) target=s${i}x; cmd=(snapshot create "$target" --volume src) ;;
    restore.*) target=r${i}x; cmd=(volume create "$target" --from-snapshot base) ;;
    clone.*) target=c${i}x; cmd=(volume create "$target" --from-volume src) ;;
  esac
  NBDCSI_FAULT=$point daemon_start "$POOL"
  # Copy points fire in the background after the command has returned, so its exit status
  # says nothing; that the daemon died at the point (86) is what matters.
  nbdctl "${cmd[@]}" >"$W/op.out" 2>&1 || true
  daemon_reap 30
  [ "$DAEMON_RC" = 86 ] || die "daemon exited $DAEMON_RC at fault point $point (want 86): did it fire? $(cat "$W/op.out")"
  grep -q "fault point $point hit" "$W/datapathd.log" || die "no 'fault point $point hit' in the daemon log"
  check "$point" "$kind" "$target"
  daemon_stop
  step "fault point $point: consistent after restart"
done
step "PASS ($FS, ${#POINTS[@]} fault points)"
