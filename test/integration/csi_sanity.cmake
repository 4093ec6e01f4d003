# Upstream csi-sanity (CSI 1.10) against the quickstart's three daemons on this host: 0 failed.
# Root, FUSE and loop devices; skipped without a csi-sanity binary (the script says where it
# looks). About 40 s.
nbdcsi_add_test(NAME integration.csi_sanity
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/csi_sanity.sh
  TIMEOUT 300 LABELS integration sanity)
