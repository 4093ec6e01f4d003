# common/process: signals taken synchronously, the crash report, and the exit that skips static
# destructors. Each case runs in a forked child.
nbdcsi_add_gtest(process_test ${CMAKE_CURRENT_LIST_DIR}/process_test.cpp nbdcsi_common)
