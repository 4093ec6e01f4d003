# Power-cut durability (test/vm/powercut.sh): the pool's file system sits on dm-log-writes while
# nbd-datapathd serves a kernel-attached volume to a stamped writer and volumes are created,
# resized, snapshotted and deleted; the log is then replayed to every FLUSH, FUA and mark, and at
# each point the file system is checked, the pool opened with the daemon's own code and every
# acknowledged write and operation verified. One test per pool file system (xfs: reflink
# snapshots; ext4: background-copy snapshots), and a self-check with a fault injected
# (powercut/fault_preload.cpp: ONE of the daemon's FLUSH fdatasyncs skipped) that must be detected.
# Duration: 3 to 5 minutes each on an idle 2-core host, up to 11 when the host is heavily loaded
# (TCG: every point's mount, pool check and xfs_repair/e2fsck run emulated); the limits allow that.
add_executable(powercut-writer ${CMAKE_CURRENT_LIST_DIR}/powercut/writer.cpp)
target_link_libraries(powercut-writer PRIVATE logwrites_lib CLI11::CLI11)
add_library(powercut_check STATIC ${CMAKE_CURRENT_LIST_DIR}/powercut/check.cpp)
target_link_libraries(powercut_check PUBLIC nbd_pool)
add_executable(powercut-replay ${CMAKE_CURRENT_LIST_DIR}/powercut/replay_main.cpp)
target_link_libraries(powercut-replay PRIVATE powercut_check logwrites_lib CLI11::CLI11
  Threads::Threads)
# The per-point check itself, on pools in a temp directory (no VM): each kind of loss is reported.
nbdcsi_add_gtest(powercut_check_test ${CMAKE_CURRENT_LIST_DIR}/powercut/check_test.cpp powercut_check)
add_library(powercut-fault SHARED ${CMAKE_CURRENT_LIST_DIR}/powercut/fault_preload.cpp)
# Only liburing's header (the ring layout): the functions it wraps are the daemon's (RTLD_NEXT).
target_include_directories(powercut-fault PRIVATE ${URING_INCLUDE_DIRS})
target_link_libraries(powercut-fault PRIVATE ${CMAKE_DL_LIBS})
set_target_properties(powercut-writer powercut-replay powercut-fault PROPERTIES
  RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin
  LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin)

set(_pc_files
  --file ${CMAKE_CURRENT_LIST_DIR}/lib.sh:/opt/lib/nbdcsi-vm.sh
  --file $<TARGET_FILE:nbd-datapathd>:/opt/bin/
  --file $<TARGET_FILE:nbdctl>:/opt/bin/
  --file $<TARGET_FILE:logwrites>:/opt/bin/
  --file $<TARGET_FILE:powercut-writer>:/opt/bin/
  --file $<TARGET_FILE:powercut-replay>:/opt/bin/
  --file $<TARGET_FILE:powercut-fault>:/opt/lib/libpowercut-fault.so)
foreach(fs xfs ext4)
  nbdcsi_add_test(NAME vm.powercut_${fs}
    COMMAND ${CMAKE_CURRENT_LIST_DIR}/nbd-kernel-vm --timeout 780 --mem 2048
      --modules dm-log-writes,dm-snapshot --env POWERCUT_FS=${fs} ${_pc_files}
      ${CMAKE_CURRENT_LIST_DIR}/powercut.sh
    TIMEOUT 840 LABELS vm powercut SERIAL)
endforeach()
nbdcsi_add_test(NAME vm.powercut_fault
  COMMAND ${CMAKE_CURRENT_LIST_DIR}/nbd-kernel-vm --timeout 420 --mem 2048
    --modules dm-log-writes,dm-snapshot --env POWERCUT_FS=xfs --env POWERCUT_FAULT=skip-flush:2
    ${_pc_files} ${CMAKE_CURRENT_LIST_DIR}/powercut.sh
  TIMEOUT 480 LABELS vm powercut SERIAL)
