#!/usr/bin/env bash
# BLOCK_STATUS through nbdinfo --map (base:allocation): a fresh volume is one hole, written
# data shows as data, and a TRIMmed range turns back into hole+zero.
. "$(dirname "$0")/lib.sh"
need nbdinfo nbdsh jq
lib_init
daemon_start
vol_create m 64Mi
uri=$(nbd_uri m)

# extent_types OFF LEN -> the distinct base:allocation types that cover [OFF, OFF+LEN).
extent_types() {
  nbdinfo --map --json "$uri" | jq -r --argjson o "$1" --argjson l "$2" \
    '[.[] | select(.offset < ($o + $l) and (.offset + .length) > $o) | .type] | unique | map(tostring) | join(",")'
}
# The extents must also tile the whole device with no gap, whatever a server merges.
check_tiling() {
  nbdinfo --map --json "$uri" | jq -e --argjson size $((64 << 20)) '
    reduce .[] as $e ({next: 0, ok: true}; {next: ($e.offset + $e.length), ok: (.ok and $e.offset == .next)})
    | .ok and .next == $size' >/dev/null || die "extents do not tile the device: $(nbdinfo --map "$uri")"
}

step "a fresh thin volume is all hole"
[ "$(extent_types 0 $((64 << 20)))" = 3 ] || die "fresh volume map: $(nbdinfo --map "$uri")"
check_tiling

step "write 4 MiB at 8 MiB"
nbdsh -u "$uri" -c 'h.pwrite(b"\xa5" * (4 << 20), 8 << 20); h.flush()' || die "write failed"
[ "$(extent_types $((8 << 20)) $((4 << 20)))" = 0 ] || die "written range is not data: $(nbdinfo --map "$uri")"
# Outside the write, it is still a hole (the server must not report the whole file as data).
[ "$(extent_types $((32 << 20)) $((32 << 20)))" = 3 ] || die "unwritten tail is not a hole: $(nbdinfo --map "$uri")"
check_tiling

step "TRIM 2 MiB in the middle of it"
nbdsh -u "$uri" -c 'h.trim(2 << 20, 9 << 20); h.flush()' || die "trim failed"
[ "$(extent_types $((9 << 20)) $((2 << 20)))" = 3 ] || die "trimmed range is not hole+zero: $(nbdinfo --map "$uri")"
[ "$(extent_types $((8 << 20)) $((1 << 20)))" = 0 ] || die "data before the trim vanished: $(nbdinfo --map "$uri")"
[ "$(extent_types $((11 << 20)) $((1 << 20)))" = 0 ] || die "data after the trim vanished: $(nbdinfo --map "$uri")"
check_tiling

step "the data around the hole is intact and the hole reads as zeroes"
nbdsh -u "$uri" -c '
assert h.pread(1 << 20, 8 << 20) == b"\xa5" * (1 << 20)
assert h.pread(2 << 20, 9 << 20) == bytes(2 << 20)
assert h.pread(1 << 20, 11 << 20) == b"\xa5" * (1 << 20)
' || die "read-back around the trimmed range failed"

step "WRITE_ZEROES with NO_HOLE, plain and FAST_ZERO read back as zeroes, neighbours intact"
nbdsh -u "$uri" -c '
import errno
h.pwrite(b"\x5a" * (4 << 20), 20 << 20)
h.zero(1 << 20, 20 << 20, nbd.CMD_FLAG_NO_HOLE)
h.zero(1 << 20, 21 << 20)
try:
    # libnbd refuses the flag client-side unless the server advertised it.
    h.zero(1 << 20, 22 << 20, nbd.CMD_FLAG_FAST_ZERO if h.can_fast_zero() else 0)
except nbd.Error as e:
    # FAST_ZERO may be refused, but only with ENOTSUP (the client then falls back).
    assert e.errnum == errno.ENOTSUP, e
h.flush()
assert h.pread(3 << 20, 20 << 20) == bytes(3 << 20)
assert h.pread(1 << 20, 23 << 20) == b"\x5a" * (1 << 20)
' || die "write-zeroes checks failed"
# NO_HOLE must leave the range allocated. A server that zeroes with FALLOC_FL_ZERO_RANGE gets
# unwritten extents, which SEEK_HOLE on ext4/XFS calls holes: reporting those as HOLE would tell
# a thin-provisioning client the space is free. Peers built on SEEK_DATA fail here (qemu-nbd).
case $(extent_types $((20 << 20)) $((1 << 20))) in
  0 | 2 | 0,2) ;;
  *) die "NO_HOLE zeroing is reported as a hole: $(nbdinfo --map "$uri")" ;;
esac
[ "$(extent_types $((23 << 20)) $((1 << 20)))" = 0 ] || die "data after the zeroed range: $(nbdinfo --map "$uri")"
check_tiling
daemon_alive || die "daemon died"
daemon_stop
