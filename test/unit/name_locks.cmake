# common/name_locks.h: the one per-name in-flight guard of every layer.
nbdcsi_add_gtest(name_locks_test ${CMAKE_CURRENT_LIST_DIR}/name_locks_test.cpp nbdcsi_common)
