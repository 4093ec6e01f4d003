#!/usr/bin/env bash
# A 256 MiB random image copied in with nbdcopy reads back byte-identical through nbdcopy, and
# qemu-img compare (a second, independent client) agrees with the source file.
. "$(dirname "$0")/lib.sh"
need nbdcopy qemu-img sha256sum
lib_init
daemon_start
vol_create img 256Mi

src=$W/src.raw
step "make a 256 MiB random image with a 16 MiB hole in the middle"
random_file "$src" $((256 << 20))
# The zero run checks that nbdcopy's zero detection (sparse writes / WRITE_ZEROES) lands zeroes.
dd if=/dev/zero of="$src" bs=1M seek=100 count=16 conv=notrunc status=none
want=$(sha256sum <"$src" | cut -d' ' -f1)

step "nbdcopy file -> nbd"
nbdcopy --flush "$src" "$(nbd_uri img)" || die "nbdcopy in failed"

step "nbdcopy nbd -> file, compare"
nbdcopy "$(nbd_uri img)" "$W/back.raw" || die "nbdcopy out failed"
got=$(sha256sum <"$W/back.raw" | cut -d' ' -f1)
[ "$got" = "$want" ] || { cmp "$src" "$W/back.raw" | head -3 >&2; die "read-back differs from source"; }
rm -f "$W/back.raw"

step "qemu-img compare file vs export"
qemu-img compare -f raw -F raw "$src" "$(nbd_uri img)" || die "qemu-img compare reports a difference"

step "the data is on disk after a clean daemon restart"
daemon_stop
if is_datapathd; then
  daemon_start
  nbdcopy "$(nbd_uri img)" - | sha256sum | grep -q "^$want " || die "data differs after restart"
  daemon_stop
fi
