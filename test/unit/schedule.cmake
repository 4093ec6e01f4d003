# Recurring snapshots and backups (datapath/schedule): the runner over a real pool in a temp dir
# with a fake clock, and backups against the in-memory object store.
nbdcsi_add_gtest(schedule_runner_test ${CMAKE_CURRENT_LIST_DIR}/schedule_runner_test.cpp
                 nbd_schedule)
