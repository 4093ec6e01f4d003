# Snapshots, restores and clones (datapath/pool). The suite mounts loop images (XFS with
# reflink, ext4) and skips without the privilege to do so.
nbdcsi_add_gtest(pool_snapshot_test ${CMAKE_CURRENT_LIST_DIR}/pool_snapshot_test.cpp nbd_pool)
