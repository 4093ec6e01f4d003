# CopyJob (datapath/pool/copy_job.cpp): sparse copy, cancel, point-in-time under concurrent
# writes, on the temp dir's file system and on /dev/shm. The ENOSPC case mounts a small tmpfs
# and skips itself without CAP_SYS_ADMIN.
nbdcsi_add_gtest(copy_job_test ${CMAKE_CURRENT_LIST_DIR}/copy_job_test.cpp nbd_pool)
# About 25 s alone; the point-in-time cases fsync under concurrent writers and took over 120 s
# beside a VM test and stress-ng on 2 cores. The limit catches a hang, not slowness.
set_tests_properties(unit.copy_job_test PROPERTIES TIMEOUT 300)
