nbdcsi_add_gtest(write_gate_test ${CMAKE_CURRENT_LIST_DIR}/write_gate_test.cpp nbd_pool)
