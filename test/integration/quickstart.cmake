# scripts/quickstart.sh (the README's main command) end to end, and killed midway. Root, FUSE and
# loop devices; each run takes ~30-60 s on the fallback attach path.
nbdcsi_add_test(NAME integration.quickstart
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/quickstart_test.sh full
  TIMEOUT 300 LABELS integration quickstart)
nbdcsi_add_test(NAME integration.quickstart_interrupt
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/quickstart_test.sh interrupt
  TIMEOUT 600 LABELS integration quickstart)
# scripts/datapath-tour.sh (the datapath alone, no CSI) end to end; ~15 s.
nbdcsi_add_test(NAME integration.datapath_tour
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/datapath_tour_test.sh
  TIMEOUT 180 LABELS integration quickstart)
