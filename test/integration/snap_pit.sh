#!/usr/bin/env bash
# Point-in-time snapshots under live writes: snap_pit.sh xfs|ext4
# (XFS reflink=1 takes the FICLONE path, ext4 the background copy with copy-before-write).
# A Python/libnbd writer keeps 2 connections x 8 stamped 4 KiB writes in flight while
# `nbdctl snapshot create` runs, then keeps writing (on ext4 while the copy is still filling
# the snapshot). The snapshot is restored to a new volume, which must hold, per block, a write
# no older than the newest one acknowledged before the snapshot began and issued before it
# returned; the live volume must hold the newest write of every block. See snap_pit.py.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/snap_lib.sh"
FS=${1:?usage: snap_pit.sh xfs|ext4}
is_datapathd || skip "snapshots are an nbd-datapathd feature"
lib_init
snap_pool_mount "$FS"
if [ "${SNAP_NO_REFLINK:-0}" = 1 ]; then daemon_start "$POOL" -- --no-reflink; else daemon_start "$POOL"; fi
snap_assert_pool "$FS"

vol_create live 96Mi
step "writing under a snapshot"
"$PY" "$SNAP_LIB_DIR/snap_pit.py" write "$(nbd_uri live)" "$W/writes.pkl" --pre 1.0 --post 1.5 -- \
  "$NBDCSI_BIN/nbdctl" --api "unix://$API_SOCK" snapshot create pit --volume live ||
  die "writer failed"
grep -h "writes paused" "$W/datapathd.log" | tail -1 >&2 || true

nbdctl -o json snapshot inspect pit >"$W/pit.json" || die "snapshot inspect pit"
want_method=$([ "$FS" = xfs ] && [ "${SNAP_NO_REFLINK:-0}" != 1 ] && echo reflink || echo copy)
[ "$(jget "$W/pit.json" 'j["method"]')" = "$want_method" ] ||
  die "snapshot method $(jget "$W/pit.json" 'j["method"]') on $FS, want $want_method"
[ "$(jget "$W/pit.json" 'j["source_volume"]')" = live ] || die "snapshot source_volume is not 'live'"
[ "$(jget "$W/pit.json" 'j["size_bytes"]')" = $((96 << 20)) ] || die "snapshot size_bytes wrong"
wait_json_ready snapshot pit
vol_from_snapshot restored pit
step "verifying the restored snapshot"
"$PY" "$SNAP_LIB_DIR/snap_pit.py" verify-snapshot "$(nbd_uri restored)" "$W/writes.pkl" ||
  die "restored snapshot is not point-in-time"
step "verifying the live volume"
"$PY" "$SNAP_LIB_DIR/snap_pit.py" verify-live "$(nbd_uri live)" "$W/writes.pkl" ||
  die "live volume lost writes across the snapshot"
daemon_stop
step "PASS ($FS)"
