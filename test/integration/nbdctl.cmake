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
# Schedules through a real nbd-datapathd: `nbdctl volume schedule` set/show/clear, persistence,
# and the catch-up run at start driven by the daemon's own state file (a few seconds, no waiting
# for a fire time).
nbdcsi_add_test(NAME integration.nbdctl_schedule
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/nbdctl_schedule.sh
  TIMEOUT 120 LABELS integration)
