#!/bin/bash
# The fuse attach path (nbdfuse + loop device), which nbd-datapathd chooses by itself when the
# kernel has no nbd driver, as on this machine. Real kernel loop devices, a real FUSE mount, real
# file systems:
#   - attach -> /dev/loopN, mode fuse, link ok, the fallback logged once; attach again: same device
#   - ext4: mkfs, mount, write, detach refused while mounted, umount, fsck clean
#   - online grow while mounted: volume resize + ResizeAttachment (the loop device grows with the
#     file system mounted), then xfs_growfs (XFS) / resize2fs (ext4), df shows the new size, data
#     intact. Online ext4 growth needs CAP_SYS_RESOURCE (EXT4_IOC_RESIZE_FS); containers often
#     drop it, and then ext4 is grown offline after the online device grow.
#   - the growable export nbdfuse uses: a 1 PiB window, zeroes past the volume's end, ENOSPC for
#     writes there
#   - detach leaves no loop device, no mount and no nbdfuse process (nor a zombie)
#   - kill -9 of the daemon with a mounted fuse attachment: the restarted daemon lists it with
#     link down, refuses to attach over it while mounted, and detach cleans everything up; also
#     when the FUSE mount went away with the daemon (a container restart)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

skip_or_fail() {
  if [ "${CI:-}" = true ]; then die "$* (CI=true: this test must run)"; fi
  skip "$*"
}
[ "$(id -u)" = 0 ] || skip_or_fail "needs root (loop devices, mounts)"
[ -c /dev/fuse ] && [ -w /dev/fuse ] || skip_or_fail "needs /dev/fuse"
[ -c /dev/loop-control ] || skip_or_fail "needs /dev/loop-control"
for t in nbdfuse losetup mkfs.ext4 e2fsck resize2fs mkfs.xfs xfs_growfs nbdsh blockdev; do
  command -v "$t" >/dev/null 2>&1 || skip_or_fail "needs $t"
done

lib_init
# --require-kernel-nbd (chart: datapath.kernelNbd.mode required) on this kernel without nbd:
# the daemon refuses to start rather than attach the slow way.
if [ ! -d /sys/module/nbd ]; then
  rc=0; mkdir -p "$W/refused-pool"
  "$NBDCSI_BIN/nbd-datapathd" --pool "$W/refused-pool" --api "unix://$W/refused-api.sock" \
    --nbd-listen "unix://$W/refused-nbd.sock" --require-kernel-nbd >"$W/refused.log" 2>&1 || rc=$?
  [ $rc = 1 ] || { cat "$W/refused.log" >&2; die "--require-kernel-nbd without nbd.ko: exit $rc, want 1"; }
  grep -q "require-kernel-nbd refuses the nbdfuse fallback" "$W/refused.log" ||
    { cat "$W/refused.log" >&2; die "--require-kernel-nbd: the refusal does not say why"; }
  step "--require-kernel-nbd without nbd.ko: refused to start"
fi
MNT=$W/mnt
mkdir -p "$MNT/f" "$MNT/g"
# Whatever happens, nothing may stay mounted or bound (runs after the daemon is stopped): the
# file systems first, then the loop devices (found by their backing file while its FUSE mount
# still resolves), then the FUSE mounts, which lets nbdfuse exit.
cleanup_fuse() {
  local f d
  umount -l "$MNT/f" "$MNT/g"
  for f in /sys/block/loop*/loop/backing_file; do
    [[ "$(cat "$f" 2>/dev/null)" == "$W/pool/attachments/fuse/"* ]] || continue
    d=${f#/sys/block/}; losetup -d "/dev/${d%%/*}"
  done
  # No trailing slash in the glob: a dead FUSE mount cannot be stat'ed, and must still match.
  for d in "$W"/pool/attachments/fuse/*; do [ -f "$d" ] || umount -l "$d"; done
}
on_exit cleanup_fuse

daemon_start
# Said once at start-up, before any volume needs it.
grep -q 'volumes attach through the nbdfuse + loop FALLBACK' "$W/datapathd.log" ||
  die "the start-up log does not announce the fallback"
# ResizeAttachment through nbdctl; prints the attachment's new size in bytes.
resize_attachment() { nbdctl -o json resize-attachment "$1" | jq -r .size_bytes; }
json() { nbdctl -o json "$@"; }
field() { $PY -c 'import json,sys; d=json.load(sys.stdin); print(d[sys.argv[1]] if not isinstance(d[sys.argv[1]], bool) else str(d[sys.argv[1]]).lower())' "$1"; }
# No loop device, mount or nbdfuse of volume $1 may be left.
assert_clean() {
  local dir=$W/pool/attachments/fuse/$1
  [ -z "$(losetup -nO NAME -j "$dir/disk" 2>/dev/null)" ] || die "$1: a loop device is still bound: $(losetup -j "$dir/disk")"
  ! grep -q " $dir " /proc/self/mounts || die "$1: $dir is still mounted"
  local p
  p=$(pgrep -f "nbdfuse .*$dir/disk" || true)
  [ -z "$p" ] || die "$1: nbdfuse still runs (pid $p, state $(ps -o stat= -p "$p" 2>/dev/null))"
  ps --ppid "$DAEMON_PID" -o stat=,comm= | grep -q '^Z.*nbdfuse' && die "$1: the daemon left a zombie nbdfuse"
  return 0
}

vol_create f1 64Mi
json attach f1 >"$W/a.json" || die "attach f1 failed"
DEV=$(field device <"$W/a.json")
[ "$(field mode <"$W/a.json")" = fuse ] || die "attach f1: mode $(field mode <"$W/a.json"), want fuse"
[ "$(field link_ok <"$W/a.json")" = true ] || die "attach f1: link down: $(field link_error <"$W/a.json")"
[[ $DEV == /dev/loop* ]] || die "attach f1: device $DEV, want /dev/loopN"
[ "$(blockdev --getsize64 "$DEV")" = $((64 << 20)) ] || die "$DEV is $(blockdev --getsize64 "$DEV") bytes, want 64 MiB"
grep -q 'using nbdfuse + loop, slower, does not survive a datapath restart' "$W/datapathd.log" ||
  die "the fallback was not logged"
[ "$(cat /sys/block/${DEV#/dev/}/loop/autoclear)" = 0 ] || die "$DEV has autoclear set"
step "attach f1 -> $DEV (fuse, direct I/O $(cat /sys/block/${DEV#/dev/}/loop/dio))"

json attach f1 >"$W/a2.json"
[ "$(field device <"$W/a2.json")" = "$DEV" ] || die "attach again gave $(field device <"$W/a2.json"), want $DEV"
[ "$(pgrep -fc "nbdfuse .*$W/pool/attachments/fuse/f1/disk")" = 1 ] || die "attach again started another nbdfuse"
nbdctl attachments >"$W/list.txt"
grep -qE "^VOLUME +DEVICE +MODE +CONNS +SIZE +RO +BACKEND +LINK" "$W/list.txt" || die "table header: $(head -1 "$W/list.txt")"
grep -qE "^f1 +$DEV +fuse .* ok$" "$W/list.txt" || die "attachments table: $(cat "$W/list.txt")"
step "attach is idempotent; nbdctl attachments shows MODE fuse, LINK ok"

mkfs.ext4 -q -F "$DEV" >/dev/null || die "mkfs.ext4 $DEV"
mount "$DEV" "$MNT/f" || die "mount $DEV"
head -c $((8 << 20)) /dev/urandom >"$W/data"
cp "$W/data" "$MNT/f/data"
sync
cmp "$W/data" "$MNT/f/data" || die "data read back differs"
out=$(nbdctl detach f1 2>&1) && die "detach of a mounted device succeeded"
echo "$out" | grep -q "failed precondition" || die "detach while mounted: $out"
step "ext4 on $DEV: written and verified; detach refused while mounted"

# Online grow of the ext4 device: the volume, then the attachment, with the file system mounted.
nbdctl volume resize f1 --size 96Mi >/dev/null || die "volume resize f1"
out=$(resize_attachment f1) || die "ResizeAttachment f1 failed: $out"
[ "$out" = $((96 << 20)) ] || die "ResizeAttachment f1 says size $out"
[ "$(blockdev --getsize64 "$DEV")" = $((96 << 20)) ] || die "$DEV is $(blockdev --getsize64 "$DEV") bytes after resize, want 96 MiB"
out=$(resize_attachment f1) || die "ResizeAttachment f1 (again) failed: $out"
if grep -q cap_sys_resource <(capsh --decode="$(awk '/CapEff/ {print $2}' /proc/self/status)" 2>/dev/null); then
  resize2fs "$DEV" >"$W/resize2fs.log" 2>&1 || die "online resize2fs: $(cat "$W/resize2fs.log")"
  umount "$MNT/f"
  step "ext4 grown online (resize2fs while mounted)"
else
  umount "$MNT/f"
  e2fsck -fy "$DEV" >/dev/null 2>&1 || true
  resize2fs "$DEV" >"$W/resize2fs.log" 2>&1 || die "resize2fs: $(cat "$W/resize2fs.log")"
  step "device grown online; ext4 grown offline (no CAP_SYS_RESOURCE here for EXT4_IOC_RESIZE_FS)"
fi
e2fsck -fn "$DEV" >"$W/fsck.log" 2>&1 || die "e2fsck found problems: $(tail -5 "$W/fsck.log")"
mount "$DEV" "$MNT/f"
size_mb=$(df -BM --output=size "$MNT/f" | tail -1 | tr -dc 0-9)
[ "$size_mb" -gt 80 ] || die "df shows ${size_mb} MiB on $MNT/f after growing to 96 MiB"
cmp "$W/data" "$MNT/f/data" || die "data differs after the grow"
umount "$MNT/f"
step "e2fsck clean, df ${size_mb} MiB, data intact"

# XFS grows online with CAP_SYS_ADMIN only: the full online sequence, mounted throughout.
vol_create g1 320Mi
json attach g1 >"$W/g.json" || die "attach g1"
GDEV=$(field device <"$W/g.json")
mkfs.xfs -q -f "$GDEV" || die "mkfs.xfs $GDEV"
mount "$GDEV" "$MNT/g"
cp "$W/data" "$MNT/g/data"
sync
before=$(df -BM --output=size "$MNT/g" | tail -1 | tr -dc 0-9)
nbdctl volume resize g1 --size 512Mi >/dev/null || die "volume resize g1"
resize_attachment g1 >/dev/null || die "ResizeAttachment g1"
[ "$(blockdev --getsize64 "$GDEV")" = $((512 << 20)) ] || die "$GDEV did not grow"
xfs_growfs "$MNT/g" >"$W/growfs.log" 2>&1 || die "xfs_growfs: $(cat "$W/growfs.log")"
after=$(df -BM --output=size "$MNT/g" | tail -1 | tr -dc 0-9)
# XFS keeps a fixed share for its log and metadata: the growth, not the total, is checked.
[ $((after - before)) -ge 170 ] || die "df: ${before} MiB -> ${after} MiB after growing by 192 MiB"
head -c $((4 << 20)) /dev/urandom >"$W/data2"
cp "$W/data2" "$MNT/g/data2"
sync
echo 3 >/proc/sys/vm/drop_caches
cmp "$W/data" "$MNT/g/data" && cmp "$W/data2" "$MNT/g/data2" || die "XFS data differs after the online grow"
step "XFS on $GDEV grown online while mounted: df ${before} -> ${after} MiB, data intact"

# The growable export itself: what nbdfuse sees.
$PY - "$NBD_SOCK" <<'EOF' || die "growable export semantics"
import errno, sys, nbd
h = nbd.NBD()
h.set_export_name("g1@grow")
h.connect_unix(sys.argv[1])
assert h.get_size() == 1 << 50, h.get_size()
end = 512 << 20
assert h.pread(4096, end) == bytes(4096), "past the end must read as zeroes"
try:
    h.pwrite(b"x" * 4096, end)
    raise SystemExit("a write past the volume's end succeeded")
except nbd.Error as e:
    assert e.errno == errno.ENOSPC or "ENOSPC" in str(e), e
h.pwrite(b"y" * 4096, end - 4096)  # the last block is writable
EOF
umount "$MNT/g"
step "growable export: 1 PiB window, zeroes and ENOSPC past the end"

nbdctl detach f1 >/dev/null || die "detach f1"
nbdctl detach g1 >/dev/null || die "detach g1"
nbdctl detach f1 >/dev/null || die "detach f1 again (idempotent)"
assert_clean f1
assert_clean g1
[ "$(json attachments | $PY -c 'import json,sys; print(len(json.load(sys.stdin)["attachments"]))')" = 0 ] ||
  die "attachments left after detach"
step "detach: no loop device, mount or nbdfuse left; idempotent"

# A restart with a mounted fuse attachment.
json attach f1 >"$W/a3.json" || die "attach f1 (3rd)"
DEV=$(field device <"$W/a3.json")
mount "$DEV" "$MNT/f"
cmp "$W/data" "$MNT/f/data" || die "data differs after re-attach"
sync
kill -9 "$DAEMON_PID"
daemon_reap
step "nbd-datapathd killed (-9) with f1 mounted on $DEV"
daemon_start
grep -q "is a fuse attachment: nbdfuse lost its NBD connection" "$W/datapathd.log" ||
  die "the restart did not report the fuse attachment"
json attachments >"$W/l2.json"
$PY - "$W/l2.json" <<'EOF' || die "attachments after the restart: $(cat "$W/l2.json")"
import json, sys
a = json.load(open(sys.argv[1]))["attachments"]
assert len(a) == 1 and a[0]["volume"] == "f1" and a[0]["mode"] == "fuse", a
assert a[0]["link_ok"] is False and "restart" in a[0]["link_error"], a
EOF
nbdctl attachments | grep -qE "^f1 +$DEV +fuse .* down: " || die "table after restart: $(nbdctl attachments)"
out=$(nbdctl attach f1 2>&1) && die "attach over a broken, mounted fuse attachment succeeded"
echo "$out" | grep -q "unmount" || die "attach over the broken attachment: $out"
step "after the restart: f1 listed with link down, attach refused while mounted"
umount "$MNT/f" 2>/dev/null || umount -l "$MNT/f"
# The unmount of a file system whose backing store is gone can let go of the device a moment
# after umount(8) returns (the kernel releases the block device from deferred work on recent
# kernels): detach is refused as "in use" until then, and retried, as the kubelet retries
# NodeUnstage. Anything else, or still in use after 10 s, fails.
for i in $(seq 100); do
  out=$(nbdctl detach f1 2>&1) && break
  grep -q "in use" <<<"$out" && [ "$i" -lt 100 ] || die "detach f1 after the restart: $out"
  sleep 0.1
done
assert_clean f1
# And the volume attaches afresh, with its data.
json attach f1 >"$W/a4.json" || die "attach f1 after the restart"
[ "$(field link_ok <"$W/a4.json")" = true ] || die "fresh attach after the restart: link down"
DEV=$(field device <"$W/a4.json")
mount -o ro "$DEV" "$MNT/f"
cmp "$W/data" "$MNT/f/data" || die "data differs after the restart"
umount "$MNT/f"
nbdctl detach f1 >/dev/null || die "final detach"
assert_clean f1
step "detach after the restart cleaned up; a fresh attach works and the data is intact"

# A restarted container: the daemon dies and its mount namespace, with the FUSE mount, goes away
# (here: a lazy unmount); the loop device's backing path then no longer names our file, so only
# the tag in its lo_file_name still identifies it.
json attach f1 >"$W/a5.json" || die "attach f1 (5th)"
DEV=$(field device <"$W/a5.json")
kill -9 "$DAEMON_PID"
daemon_reap
umount -l "$W/pool/attachments/fuse/f1"
daemon_start
nbdctl attachments | grep -qE "^f1 +$DEV +fuse .* down: " || die "table after the mount vanished: $(nbdctl attachments)"
nbdctl detach f1 >/dev/null || die "detach f1 after its FUSE mount vanished"
[ -z "$(cat "/sys/block/${DEV#/dev/}/loop/backing_file" 2>/dev/null)" ] ||
  die "$DEV is still bound after the detach: $(cat "/sys/block/${DEV#/dev/}/loop/backing_file")"
assert_clean f1
step "restart that took the FUSE mount along: the loop device is still found (by its tag) and freed"
daemon_stop
echo PASS
