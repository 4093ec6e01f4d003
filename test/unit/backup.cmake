# Backups (datapath/backup): chunks, manifests, incremental upload, a killed backup, corrupt
# chunks, garbage collection and its race with a backup, all against an in-memory store.
nbdcsi_add_gtest(backup_engine_test ${CMAKE_CURRENT_LIST_DIR}/backup_engine_test.cpp nbd_backup)
# BackupJobs over a real pool in a temp dir (background-copy snapshots) and the in-memory store.
nbdcsi_add_gtest(backup_jobs_test ${CMAKE_CURRENT_LIST_DIR}/backup_jobs_test.cpp nbd_backup)
# nbdctl backup's pure helpers (credentials file, JSON and tables).
nbdcsi_add_gtest(backup_render_test ${CMAKE_CURRENT_LIST_DIR}/backup_render_test.cpp
                 nbdctl_render)
# The S3 client's pure helpers: the s3:// URL, XML text of listings (character references).
nbdcsi_add_gtest(backup_s3_test ${CMAKE_CURRENT_LIST_DIR}/backup_s3_test.cpp nbd_backup)
# Copies from a peer (restores and clones across nodes, issue 16): a source pool served by the
# real NBD engine on a Unix socket, BackupJobs on a destination pool.
nbdcsi_add_gtest(peer_copy_test ${CMAKE_CURRENT_LIST_DIR}/peer_copy_test.cpp nbd_backup nbd_engine)
