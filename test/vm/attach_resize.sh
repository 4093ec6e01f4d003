#!/bin/bash
# Online resize of a kernel NBD attachment under a mounted file system. Runs INSIDE the VM
# (test/vm/nbd-kernel-vm ships nbd-datapathd and nbdctl to /opt/bin):
#
#   - attach (kernel mode: /dev/nbdN), mkfs.ext4, mount, write a file
#   - nbdctl volume resize, then ResizeAttachment: NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES;
#     /sys/block/nbdN/size must follow while the file system stays mounted
#   - resize2fs online, df shows the new size, the file is intact, the new space is usable
#   - umount, e2fsck clean, detach
. /opt/lib/nbdcsi-vm.sh
D=/tmp/rsz POOL=/tmp/rsz/pool API=/tmp/rsz/api.sock SOCK=/tmp/rsz/nbd.sock LOG=/tmp/rsz/datapathd.log
MNT=/mnt/rsz
fail() {
  echo "FAIL: $*"
  echo "---- datapathd log (last 30 lines) ----"; tail -n 30 "$LOG" 2>/dev/null || true
  echo "---- kernel log, nbd lines (last 20) ----"; dmesg | grep -iE 'nbd|I/O error|EXT4-fs' | tail -n 20 || true
  exit 1
}
nbdctl() { command nbdctl --api "unix://$API" --timeout 20 "$@"; }

mkdir -p "$D" "$MNT"
uname -r
nbd-datapathd --pool "$POOL" --api "unix://$API" --nbd-listen "unix://$SOCK" --workers 2 \
  --overcommit 8 --log-level info >>"$LOG" 2>&1 &
DPID=$!
for _ in $(seq 300); do [ -S "$API" ] && break; sleep 0.1; done
[ -S "$API" ] || fail "nbd-datapathd did not start"
step "nbd-datapathd up"

nbdctl volume create r1 --size 256Mi >/dev/null
out=$(nbdctl -o json attach r1) || fail "attach r1: $out"
DEV=$(jq -r .device <<<"$out")
[ "$(jq -r .mode <<<"$out")" = kernel ] || fail "attach r1: mode $(jq -r .mode <<<"$out"), want kernel"
N=${DEV#/dev/}
[ "$(cat /sys/block/$N/size)" = $((256 * 2048)) ] || fail "$DEV is $(cat /sys/block/$N/size) sectors"
mkfs.ext4 -q -F -E nodiscard "$DEV"
mount -t ext4 "$DEV" "$MNT"
head -c $((4 << 20)) /dev/urandom >"$D/data"
cp "$D/data" "$MNT/data"
sync
before=$(df -Pm "$MNT" | awk 'NR == 2 {print $2}')
step "ext4 on $DEV (256 MiB) mounted, 4 MiB written; df ${before} MiB"

nbdctl volume resize r1 --size 512Mi >/dev/null || fail "volume resize"
out=$(nbdctl resize-attachment r1 2>&1) || {
  echo "sysfs size after the refused resize: $(cat /sys/block/$N/size) sectors"
  fail "ResizeAttachment: $out"
}
echo "ResizeAttachment: $out"
[ "$(cat /sys/block/$N/size)" = $((512 * 2048)) ] ||
  fail "/sys/block/$N/size is $(cat /sys/block/$N/size) after RECONFIGURE with the new size"
dmesg | grep -i "$N" | grep -iE 'capacity|size' | tail -n 3 || true
step "RECONFIGURE + NBD_ATTR_SIZE_BYTES: /sys/block/$N/size is 512 MiB, still mounted"

resize2fs "$DEV" >"$D/resize2fs.log" 2>&1 || { cat "$D/resize2fs.log"; fail "online resize2fs"; }
after=$(df -Pm "$MNT" | awk 'NR == 2 {print $2}')
[ "$after" -gt 450 ] || fail "df shows ${after} MiB after resize2fs (was ${before})"
# More than the old file system could hold: allocated (fallocate is fast under TCG), plus real
# data written at the end of it.
fallocate -l 250M "$MNT/fill" || fail "250 MiB cannot be allocated: the new space is not usable"
head -c $((8 << 20)) /dev/urandom >"$D/data2"
cp "$D/data2" "$MNT/data2"
sync
echo 3 >/proc/sys/vm/drop_caches
cmp "$D/data" "$MNT/data" && cmp "$D/data2" "$MNT/data2" || fail "data differs after the online grow"
dmesg | grep -qE 'I/O error|Buffer I/O error|blk_update_request' && fail "I/O errors in the kernel log"
step "resize2fs online: df ${before} -> ${after} MiB, 250 MiB allocated (more than the old size), data intact"

umount "$MNT"
e2fsck -fn "$DEV" >"$D/fsck.log" 2>&1 || { cat "$D/fsck.log"; fail "e2fsck"; }
nbdctl detach r1 >/dev/null || fail "detach"
[ "$(cat /sys/block/$N/size)" = 0 ] || fail "$DEV still has a size after detach"
kill -TERM "$DPID"
wait "$DPID" || fail "nbd-datapathd exited $? on SIGTERM"
step "PASS"
