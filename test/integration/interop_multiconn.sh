#!/usr/bin/env bash
# CAN_MULTI_CONN: with two connections to one volume, a write on one followed by FLUSH on it is
# visible to a read on the other (and FUA alone is enough too), in both directions.
. "$(dirname "$0")/lib.sh"
need nbdsh
lib_init
daemon_start
vol_create mc 64Mi
step "two connections, cross-visibility after FLUSH and after FUA"
URI=$(nbd_uri mc) "$PY" - <<'PY' || die "multi-conn visibility check failed"
import os, nbd
uri = os.environ["URI"]
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(uri); b.connect_uri(uri)
assert a.can_multi_conn() and b.can_multi_conn(), "server does not advertise CAN_MULTI_CONN"
# Read first on b so any cache it might keep is populated with the old contents.
assert b.pread(65536, 1 << 20) == bytes(65536)
for i in range(50):
    off = (i * 7919 * 4096) % ((64 << 20) - 65536)
    data = os.urandom(65536)
    w, r = (a, b) if i % 2 == 0 else (b, a)
    if i % 4 < 2:
        w.pwrite(data, off); w.flush()
    else:
        w.pwrite(data, off, nbd.CMD_FLAG_FUA)
    got = r.pread(65536, off)
    assert got == data, f"iteration {i}: write on one connection not visible on the other at {off}"
a.shutdown(); b.shutdown()
PY
daemon_alive || die "daemon died"
daemon_stop
