# Local hardening with real processes and a real second uid (issue 12): every unix socket 0600,
# the datapath API and both CSI sockets checking the caller's uid with SO_PEERCRED
# (PERMISSION_DENIED for others), --allow-uid. Needs root (setpriv); a few seconds.
nbdcsi_add_test(NAME integration.local_sockets
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/local_sockets.sh
  TIMEOUT 120 LABELS integration)
