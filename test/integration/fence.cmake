# Fencing with real clients (libnbd, nbdinfo, nbdcopy) and nbdctl against nbd-datapathd:
# takeover by a newer epoch, refusals, restart, `nbdctl volume fence`, and a split-brain
# attempt (two writers taking turns over 8 epochs for 3 s). About 10 s.
nbdcsi_add_test(NAME integration.fence
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/fence.sh
  TIMEOUT 120 LABELS integration)
