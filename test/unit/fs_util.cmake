# common/fs_util: durable small-file helpers shared by the pool and the engine.
nbdcsi_add_gtest(fs_util_test ${CMAKE_CURRENT_LIST_DIR}/fs_util_test.cpp nbdcsi_common)
