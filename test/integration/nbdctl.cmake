# nbdctl against a real nbd-datapathd (starts its own daemon in a temp dir; a few seconds).
nbdcsi_add_test(NAME integration.nbdctl_cli
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/nbdctl_cli.sh
  TIMEOUT 120 LABELS integration)
# Snapshots, restores and clones through nbdctl, data checked with nbdcopy (a few seconds).
nbdcsi_add_test(NAME integration.nbdctl_snapshot
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/nbdctl_snapshot.sh
  TIMEOUT 120 LABELS integration)
# `nbdctl --wait` progress on background copies of a sparse volume (--no-reflink): lines count
# allocated data, reach 100 %, JSON and pipes stay quiet (about 10 s: 192 MiB copied 5 times).
nbdcsi_add_test(NAME integration.nbdctl_progress
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/nbdctl_progress.sh
  TIMEOUT 180 LABELS integration)
