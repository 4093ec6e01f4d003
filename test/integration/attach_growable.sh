#!/bin/bash
# The growable export that fuse attachments connect nbdfuse to (NAME@grow, frontend.h), with
# libnbd as the client; no root needed, so it also runs where attach_fuse skips:
#   - it advertises a 1 PiB window; the plain name still advertises the volume's size, and the
#     export list does not show the @grow form
#   - past the volume's end: reads are zeroes; WRITE, WRITE_ZEROES and TRIM fail with ENOSPC
#   - after a volume resize the same connection (no reconnect) can write the new region and
#     reads it back, while the old end of a plain connection stays where it was negotiated
#   - "@grow" alone and a missing volume are refused
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need nbdsh
lib_init
daemon_start
vol_create gv 8Mi

$PY - "$NBD_SOCK" "$API_SOCK" "$NBDCSI_BIN/nbdctl" <<'EOF' || die "growable export"
import errno, subprocess, sys, nbd
sock, api, nbdctl = sys.argv[1:4]
MiB = 1 << 20

def connect(name):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h

def enospc(fn, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno == errno.ENOSPC or "ENOSPC" in str(e), f"{what}: {e}"
        return
    raise AssertionError(f"{what} past the end succeeded")

g = connect("gv@grow")
plain = connect("gv")
assert g.get_size() == 1 << 50, g.get_size()
assert plain.get_size() == 8 * MiB, plain.get_size()

g.pwrite(b"a" * 4096, 8 * MiB - 4096)              # the last block is the volume's
assert g.pread(4096, 8 * MiB - 4096) == b"a" * 4096
assert g.pread(8192, 8 * MiB - 4096) == b"a" * 4096 + bytes(4096)  # straddling the end
assert g.pread(4096, 100 * MiB) == bytes(4096)
enospc(lambda: g.pwrite(b"b" * 4096, 8 * MiB), "WRITE")
enospc(lambda: g.pwrite(b"b" * 8192, 8 * MiB - 4096), "WRITE straddling the end")
if g.can_zero():
    enospc(lambda: g.zero(4096, 9 * MiB), "WRITE_ZEROES")
if g.can_trim():
    enospc(lambda: g.trim(4096, 9 * MiB), "TRIM")
# The refused straddling write changed nothing.
assert g.pread(4096, 8 * MiB - 4096) == b"a" * 4096

subprocess.run([nbdctl, "--api", "unix://" + api, "volume", "resize", "gv", "--size", "16Mi"],
               check=True, stdout=subprocess.DEVNULL)
# Same connection, no reconnect: the new region is the volume's now.
g.pwrite(b"c" * 4096, 12 * MiB)
assert g.pread(4096, 12 * MiB) == b"c" * 4096
enospc(lambda: g.pwrite(b"d" * 4096, 16 * MiB), "WRITE past the new end")
# A plain connection keeps the size it negotiated (it was told 8 MiB).
try:
    plain.pread(4096, 12 * MiB)
    raise AssertionError("a plain connection read past its negotiated size")
except nbd.Error:
    pass
assert connect("gv").get_size() == 16 * MiB

for bad in ("@grow", "nope@grow"):
    try:
        connect(bad)
        raise AssertionError(f"export {bad!r} was accepted")
    except nbd.Error:
        pass

lister = nbd.NBD()
lister.set_opt_mode(True)
lister.connect_unix(sock)
names = []
lister.opt_list(lambda name, desc: names.append(name) or 0)
assert names == ["gv"], names
EOF
step "growable export: window, zeroes and ENOSPC past the end, live growth on one connection"
daemon_stop
echo PASS
