# The log level at run time: `nbdctl log-level` against a real nbd-datapathd (debug lines appear
# and stop, --for reverts, bad input exits 2, the API's access control), and SIGUSR1/SIGUSR2 on
# all three daemons (about 10 s).
nbdcsi_add_test(NAME integration.log_level
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/log_level.sh TIMEOUT 120 LABELS integration)
