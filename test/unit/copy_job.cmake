# CopyJob (datapath/pool/copy_job.cpp): sparse copy, cancel, point-in-time under concurrent
# writes, on the temp dir's file system and on /dev/shm. The ENOSPC case mounts a small tmpfs
# and skips itself without CAP_SYS_ADMIN.
nbdcsi_add_gtest(copy_job_test ${CMAKE_CURRENT_LIST_DIR}/copy_job_test.cpp nbd_pool)
