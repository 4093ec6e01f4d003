#!/usr/bin/env bash
# Snapshots, restores and clones are whole, independent volumes: snap_clone.sh xfs|ext4
# An image with data and holes goes in with nbdcopy; a snapshot of it is restored at the same
# size and larger, the live volume is cloned, and each is compared with the image by qemu-img
# (a different NBD client than the writer). Writes to a clone or a restore must not reach the
# source or the snapshot, and a snapshot must outlive its source volume.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/snap_lib.sh"
FS=${1:?usage: snap_clone.sh xfs|ext4}
is_datapathd || skip "snapshots are an nbd-datapathd feature"
need nbdcopy qemu-img qemu-io nbdsh
lib_init
snap_pool_mount "$FS"
daemon_start "$POOL"
snap_assert_pool "$FS"

MI=$((1 << 20))
SIZE=$((64 * MI))
IMG=$W/image.raw
# Data, holes and a zeroed-but-written region, so sparse copies and FICLONE of holes both count.
truncate -s $SIZE "$IMG"
for off in 0 5 17 40 60; do
  head -c $((3 * MI)) /dev/urandom | dd of="$IMG" bs=1M seek=$off conv=notrunc status=none
done
dd if=/dev/zero of="$IMG" bs=1M seek=30 count=2 conv=notrunc status=none
cp "$IMG" "$W/image.orig"

# same URI against IMAGE (qemu-img compare: content equal; a larger target must be zero beyond).
compare() {
  qemu-img compare -f raw -F raw "$2" "$(nbd_uri "$1")" >"$W/cmp.$1.out" 2>&1 ||
    { cat "$W/cmp.$1.out" >&2; die "volume $1 differs from $(basename "$2")"; }
}

vol_create src 64Mi
nbdcopy "$IMG" "$(nbd_uri src)" || die "nbdcopy into src"
compare src "$IMG"
step "src written with nbdcopy"

snap_create s1 src
vol_from_snapshot r_same s1
vol_from_snapshot r_big s1 --size 128Mi
vol_from_volume c1 src
nbdctl -o json volume inspect r_big >"$W/rbig.json"
[ "$(jget "$W/rbig.json" 'j["size_bytes"]')" = $((128 * MI)) ] || die "r_big is not 128 MiB"
[ "$(jget "$W/rbig.json" 'j.get("source")')" = snapshot/s1 ] || die "r_big source is $(jget "$W/rbig.json" 'j.get("source")')"
nbdctl -o json volume inspect c1 >"$W/c1.json"
[ "$(jget "$W/c1.json" 'j.get("source")')" = volume/src ] || die "c1 source is $(jget "$W/c1.json" 'j.get("source")')"
# Restoring smaller than the snapshot would drop data: must be refused.
nbdctl volume create r_small --from-snapshot s1 --size 32Mi >"$W/rsmall.out" 2>&1 &&
  die "restore to a smaller size was accepted"
step "restored (same size, larger), cloned; smaller restore refused: $(tail -1 "$W/rsmall.out")"

compare r_same "$IMG"
compare c1 "$IMG"
compare r_big "$IMG"
# compare's zero tail check, independently: the grown part reads as zeros over NBD.
nbdsh -u "$(nbd_uri r_big)" -c "
import sys
size = h.get_size()
assert size == $((128 * MI)), size
for off in range($SIZE, size, 8 << 20):
    if h.pread(8 << 20, off) != bytes(8 << 20):
        sys.exit('r_big: non-zero data past the snapshot size at %d' % off)
" || die "r_big tail is not zero"
step "r_same, r_big (prefix + zero tail), c1 match the image"

# The grown part of a larger restore is ordinary writable space: fio writes and verifies it,
# and the restored prefix stays intact.
if fio --enghelp 2>/dev/null | grep -qw nbd; then
  fio --name=tail --ioengine=nbd --uri="$(nbd_uri r_big)" --rw=randwrite --bs=4k --iodepth=8 \
    --offset=$SIZE --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output="$W/fio.tail.out" >/dev/null || { cat "$W/fio.tail.out" >&2; die "fio verify on r_big's tail"; }
  qemu-img compare -f raw -F raw "$IMG" "$(nbd_uri r_big)" >/dev/null 2>&1 &&
    die "qemu-img compare missed fio's data in r_big's tail"
  "$PY" - "$IMG" "$(nbd_uri r_big)" <<'PYEOF' || die "r_big's restored prefix changed under writes to its tail"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[2])
want = open(sys.argv[1], "rb").read()
chunk = 4 << 20  # well below the 32 MiB NBD request limit
sys.exit(0 if all(h.pread(chunk, o) == want[o:o + chunk] for o in range(0, len(want), chunk)) else 1)
PYEOF
  step "fio wrote and verified r_big's tail; its prefix is unchanged"
fi

# Independence: write to the clone and the restore from a different client, at different spots.
head -c $((2 * MI)) /dev/urandom >"$W/patch"
qemu-io -f raw -c "write -P 0x5a 0 1M" -c "write -P 0xa5 33M 1M" "$(nbd_uri c1)" >/dev/null ||
  die "qemu-io write to c1"
nbdcopy "$W/patch" "$(nbd_uri r_same)" || die "nbdcopy to r_same"
# What c1 and r_same must now hold.
cp "$IMG" "$W/c1.want"; cp "$IMG" "$W/rsame.want"
"$PY" - "$W/c1.want" "$W/rsame.want" "$W/patch" <<'PYEOF'
import sys
c1, rs, patch = sys.argv[1:]
with open(c1, "r+b") as f:
    f.seek(0); f.write(b"\x5a" * (1 << 20)); f.seek(33 << 20); f.write(b"\xa5" * (1 << 20))
with open(rs, "r+b") as f:
    f.write(open(patch, "rb").read())
PYEOF
compare c1 "$W/c1.want"
compare r_same "$W/rsame.want"
compare src "$IMG"
vol_from_snapshot r_check s1
compare r_check "$IMG"
step "writes to c1 and r_same stay there: src and s1 unchanged"

# And the other way round: writing to the source leaves the clone and the snapshot alone.
qemu-io -f raw -c "write -P 0x33 8M 2M" "$(nbd_uri src)" >/dev/null || die "qemu-io write to src"
compare c1 "$W/c1.want"
compare r_check "$IMG"
step "writes to src do not reach c1 or r_check"

# The snapshot outlives its source.
nbdctl volume delete src >/dev/null || die "delete src"
nbdctl -o json snapshot inspect s1 >"$W/s1.json" || die "snapshot s1 gone with its source"
[ "$(jget "$W/s1.json" 'j["ready"]')" = true ] || die "s1 not ready after deleting src"
vol_from_snapshot r_after s1
compare r_after "$IMG"
compare c1 "$W/c1.want"
step "src deleted: s1 still restores to the original image"

# Everything deletes cleanly and leaves no file behind.
for v in r_same r_big c1 r_check r_after; do nbdctl volume delete "$v" >/dev/null || die "delete $v"; done
nbdctl snapshot delete s1 >/dev/null || die "delete s1"
left=$(find "$POOL/volumes" "$POOL/snapshots" -type f | wc -l)
[ "$left" = 0 ] || die "files left after deleting everything: $(find "$POOL/volumes" "$POOL/snapshots" -type f)"
daemon_stop
step "PASS ($FS)"
