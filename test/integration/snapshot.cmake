# Snapshots, restores and clones through the real daemon and CLI, each test on its own
# loop-mounted pool: XFS reflink=1 (FICLONE path) and ext4 (background copy with
# copy-before-write). They need root for mount -o loop and exit 77 (skipped) without it.
# Every script asserts that `nbdctl pool info` reports reflink true on XFS and false on ext4.
set(_snap_it ${CMAKE_CURRENT_LIST_DIR})
foreach(fs xfs ext4)
  # Stamped writes from 2 connections x QD 8 across `snapshot create`; the restored snapshot
  # must be point-in-time, the live volume must hold every newest write. The check leans
  # towards accepting on timing slack, so a loaded machine makes it weaker, never flaky.
  nbdcsi_add_test(NAME integration.snap_pit_${fs}
    COMMAND bash ${_snap_it}/snap_pit.sh ${fs}
    TIMEOUT 120 LABELS integration snapshot)
  # nbdcopy'd image -> snapshot -> restores (same size, larger) and a clone, compared with
  # qemu-img; writes to clones/restores stay there; a snapshot outlives its source.
  nbdcsi_add_test(NAME integration.snap_clone_${fs}
    COMMAND bash ${_snap_it}/snap_clone.sh ${fs}
    TIMEOUT 120 LABELS integration snapshot)
  # The daemon _exit(86)s at every snapshot./restore./clone. fault point that applies to the
  # file system; after a restart the pool holds the old or the new state, nothing else.
  nbdcsi_add_test(NAME integration.snap_crash_${fs}
    COMMAND bash ${_snap_it}/snap_crash.sh ${fs}
    TIMEOUT 180 LABELS integration snapshot)
endforeach()
# The copy path (copy-before-write) on a file system that could reflink: the daemon's
# --no-reflink must be honoured (pool info says reflink false, the snapshot method is "copy").
nbdcsi_add_test(NAME integration.snap_pit_xfs_noreflink
  COMMAND bash ${_snap_it}/snap_pit.sh xfs
  ENV SNAP_NO_REFLINK=1
  TIMEOUT 120 LABELS integration snapshot)
