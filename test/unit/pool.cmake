# Pool, QoS and stats unit tests (datapath/pool). Crash and full-disk tests fork and mount, so
# they live in their own executables with their own timeouts.
nbdcsi_add_gtest(pool_test ${CMAKE_CURRENT_LIST_DIR}/pool_test.cpp nbd_pool)
nbdcsi_add_gtest(pool_crash_test ${CMAKE_CURRENT_LIST_DIR}/pool_crash_test.cpp nbd_pool)
nbdcsi_add_gtest(pool_fulldisk_test ${CMAKE_CURRENT_LIST_DIR}/pool_fulldisk_test.cpp nbd_pool)
nbdcsi_add_gtest(qos_test ${CMAKE_CURRENT_LIST_DIR}/qos_test.cpp nbd_pool)
nbdcsi_add_gtest(stats_test ${CMAKE_CURRENT_LIST_DIR}/stats_test.cpp nbd_pool)
# The pool's rules as tables, the metadata parsers on corrupt input, and Create with sources
# (including races with deletes, held at a named step through PoolOptions::on_step).
nbdcsi_add_gtest(pool_rules_test ${CMAKE_CURRENT_LIST_DIR}/pool_rules_test.cpp nbd_pool)
nbdcsi_add_gtest(pool_metadata_test ${CMAKE_CURRENT_LIST_DIR}/pool_metadata_test.cpp nbd_pool)
nbdcsi_add_gtest(pool_create_test ${CMAKE_CURRENT_LIST_DIR}/pool_create_test.cpp nbd_pool)
# Data files cut short or removed behind the pool's back (fenced, never zero-extended or served).
nbdcsi_add_gtest(pool_data_file_test ${CMAKE_CURRENT_LIST_DIR}/pool_data_file_test.cpp nbd_pool)
