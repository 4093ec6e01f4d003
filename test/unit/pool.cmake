# Pool, QoS and stats unit tests (datapath/pool). Crash and full-disk tests fork and mount, so
# they live in their own executables with their own timeouts.
nbdcsi_add_gtest(pool_test ${CMAKE_CURRENT_LIST_DIR}/pool_test.cpp nbd_pool)
nbdcsi_add_gtest(pool_crash_test ${CMAKE_CURRENT_LIST_DIR}/pool_crash_test.cpp nbd_pool)
nbdcsi_add_gtest(pool_fulldisk_test ${CMAKE_CURRENT_LIST_DIR}/pool_fulldisk_test.cpp nbd_pool)
nbdcsi_add_gtest(qos_test ${CMAKE_CURRENT_LIST_DIR}/qos_test.cpp nbd_pool)
nbdcsi_add_gtest(stats_test ${CMAKE_CURRENT_LIST_DIR}/stats_test.cpp nbd_pool)
