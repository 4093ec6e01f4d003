# Backups to a real S3 server (s3rver, from scripts/get-s3rver.sh) through nbd-datapathd and
# nbdctl: full and incremental backups counted on the server, restores on a fresh pool, GC,
# corrupt chunks, bandwidth limit, error paths. Exits 77 when s3rver is not installed.
nbdcsi_add_test(NAME integration.backup_s3
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/backup_s3.sh
  TIMEOUT 480 LABELS integration backup)
# Backup snapshots through the CSI Controller (VolumeSnapshotClass backupTarget): two controllers
# with a datapath each ("two clusters") and one s3rver; backup, restore in the other cluster,
# incremental upload, delete, kill -9 mid-backup, error codes.
nbdcsi_add_test(NAME integration.backup_csi
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/backup_csi.sh
  TIMEOUT 300 LABELS integration backup controller)
# The S3 client's SigV4 signatures checked by an independent verifier (sigv4_proxy.py: botocore's
# signer, in front of s3rver) for every request of real backups: full, incremental, paged
# listings, restore, GC, encrypted target, session token, two regions, a prefix to URI-encode;
# a wrong secret refused. Exits 77 without s3rver or python3-botocore (fails when CI=true).
nbdcsi_add_test(NAME integration.backup_sigv4
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/backup_sigv4.sh
  TIMEOUT 300 LABELS integration backup)
