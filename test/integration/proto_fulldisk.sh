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

step "other data fills the disk: no new volume (free space under --free-reserve's 10 %), until freed"
dd if=/dev/zero of="$pool/filler" bs=1M status=none 2>/dev/null || true  # until ENOSPC
out=$(nbdctl volume create more --size 1Mi 2>&1) && die "a volume was created on a full pool: $out"
grep -q "in reserve" <<<"$out" || die "the refusal does not name the reserve: $out"
nbdctl -o json pool info >"$W/pool.json" 2>&1 || { cat "$W/pool.json" >&2; die "pool info failed"; }
jq -e '.provisionable_bytes == 0 and .free_reserve_bytes > 0' "$W/pool.json" >/dev/null ||
  die "a full pool reports room to provision: $(cat "$W/pool.json")"
rm -f "$pool/filler"
vol_create more 1Mi
nbdctl volume delete more >/dev/null || die "volume delete more"

step "restart: the volume metadata is intact"
daemon_stop
daemon_start "$pool" -- --overcommit 32
nbdctl -o json volume list >"$W/list.json" 2>&1 || { cat "$W/list.json" >&2; die "volume list failed after restart"; }
jq -e '[.. | objects | select(.name? == "big")] | length == 1' "$W/list.json" >/dev/null ||
  die "volume 'big' missing after restart: $(cat "$W/list.json")"
[ "$(nbdinfo --size "$(nbd_uri big)")" = $((1 << 30)) ] || die "volume size changed after restart"
daemon_stop

step "bad --free-reserve values are refused at start, naming the flag"
for v in 95 -1 banana; do
  rc=0
  out=$(timeout 10 "$NBDCSI_BIN/nbd-datapathd" --pool "$W/unused" --free-reserve "$v" 2>&1) || rc=$?
  [ "$rc" != 0 ] && [ "$rc" != 124 ] || die "--free-reserve $v: exit $rc (want a usage error)"
  grep -q -- "--free-reserve" <<<"$out" || die "--free-reserve $v: the error does not name the flag: $out"
  [ ! -e "$W/unused" ] || die "--free-reserve $v: the pool directory was created anyway"
done
