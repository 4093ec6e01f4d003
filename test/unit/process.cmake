# common/process: signals taken synchronously, the crash report, and the exit that skips static
# destructors. Each case runs in a forked child.
nbdcsi_add_gtest(process_test ${CMAKE_CURRENT_LIST_DIR}/process_test.cpp nbdcsi_common)
# common/log_level: the level names, durations, the control's timed changes and signal steps,
# and the datapath's Logging service handlers.
nbdcsi_add_gtest(log_level_test ${CMAKE_CURRENT_LIST_DIR}/log_level_test.cpp nbd_logging_api)
