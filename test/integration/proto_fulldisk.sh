#!/usr/bin/env bash
# A pool on a 64 MiB tmpfs, overcommitted 32x, with a 1 GiB volume: writes past the free space
# fail with ENOSPC (not EIO, not a crash), the stream stays usable, earlier data survives, and
# after a restart the pool still lists the volume with its size.
. "$(dirname "$0")/lib.sh"
"$PY" -c 'import nbd' 2>/dev/null || skip "needs python3-libnbd for $PY"
is_datapathd || skip "full-disk behaviour is specific to nbd-datapathd's pool"
lib_init
pool=$W/tiny
mkdir -p "$pool"
mount -t tmpfs -o size=64M,mode=0700 nbdcsi-fulldisk "$pool" 2>/dev/null || skip "cannot mount a tmpfs (not privileged)"
on_exit "umount '$pool' || umount -l '$pool'"
daemon_start "$pool" -- --overcommit 32
vol_create big 1Gi

step "fill the pool through NBD until ENOSPC"
URI=$(nbd_uri big) "$PY" - <<'PY' || die "full-disk behaviour wrong"
import errno, os, nbd
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
first = os.urandom(1 << 20)
h.pwrite(first, 0)
h.flush()
chunk = os.urandom(1 << 20)
enospc_at = None
for i in range(1, 200):  # 200 MiB > the 64 MiB pool
    try:
        h.pwrite(chunk, i << 20)
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC, f"write {i} MiB failed with {e} (want ENOSPC)"
        enospc_at = i
        break
assert enospc_at is not None, "200 MiB fit into a 64 MiB pool"
assert 8 <= enospc_at <= 64, f"ENOSPC after {enospc_at} MiB on a 64 MiB pool"
# The failed write was drained and the connection still works; old data is intact.
assert h.pread(1 << 20, 0) == first, "data written before the pool filled is gone"
try:
    h.pwrite(chunk, 100 << 20)
    raise AssertionError("a second write into a full pool succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, f"second write: {e}"
# Freeing space makes writes possible again.
h.trim(32 << 20, 1 << 20)
h.flush()
h.pwrite(chunk, 1 << 20)
h.flush()
assert h.pread(1 << 20, 1 << 20) == chunk
h.shutdown()
print(f"ENOSPC after {enospc_at} MiB")
PY
daemon_alive || die "daemon died on a full pool"

step "restart: the volume metadata is intact"
daemon_stop
daemon_start "$pool" -- --overcommit 32
nbdctl -o json volume list >"$W/list.json" 2>&1 || { cat "$W/list.json" >&2; die "volume list failed after restart"; }
jq -e '[.. | objects | select(.name? == "big")] | length == 1' "$W/list.json" >/dev/null ||
  die "volume 'big' missing after restart: $(cat "$W/list.json")"
[ "$(nbdinfo --size "$(nbd_uri big)")" = $((1 << 30)) ] || die "volume size changed after restart"
daemon_stop
