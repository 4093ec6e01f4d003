# Resync (datapath/replica/resync.h) over in-memory fake replicas behind its BlockChannel seam:
# only dirty regions or data extents copied, nothing reported done before a FLUSH, failures and
# cancel with their range, writes racing a copy, bounded parallelism, the rate limiter.
nbdcsi_add_gtest(resync_test ${CMAKE_CURRENT_LIST_DIR}/resync_test.cpp nbd_replica_client)
