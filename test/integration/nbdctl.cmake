# nbdctl against a real nbd-datapathd (starts its own daemon in a temp dir; a few seconds).
nbdcsi_add_test(NAME integration.nbdctl_cli
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/nbdctl_cli.sh
  TIMEOUT 120 LABELS integration)
# Snapshots, restores and clones through nbdctl, data checked with nbdcopy (a few seconds).
nbdcsi_add_test(NAME integration.nbdctl_snapshot
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/nbdctl_snapshot.sh
  TIMEOUT 120 LABELS integration)
