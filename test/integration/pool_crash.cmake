# The pool's crash safety through the real daemon and CLI (needs nbd-datapathd and nbdctl built).
nbdcsi_add_test(NAME integration.pool_crash
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/pool_crash.sh
  TIMEOUT 120 LABELS integration)
