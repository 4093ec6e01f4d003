# Fault matrix on the real kernel NBD driver (issue 12 part 4): kill -9 of nbd-datapathd,
# nbd-csi-node and nbd-csi-controller at seeded random instants while fio verifies two busy
# volumes (ext4 and a raw block device) and CSI calls are retried on them. faults_launch.sh picks
# the seed on the host (FAULTS_SEED replays, FAULTS_KILLS sets the number of kill points) and runs
# the project's VM runner (see vm.cmake for when it skips). SERIAL: the VM uses both cores.
nbdcsi_add_test(NAME vm.faults_io_restart
  COMMAND ${CMAKE_CURRENT_LIST_DIR}/faults_launch.sh --timeout 540 --mem 1536
    --file ${CMAKE_CURRENT_LIST_DIR}/lib.sh:/opt/lib/nbdcsi-vm.sh
    --file $<TARGET_FILE:nbd-datapathd>:/opt/bin/
    --file $<TARGET_FILE:nbdctl>:/opt/bin/
    --file $<TARGET_FILE:nbd-csi-node>:/opt/bin/
    --file $<TARGET_FILE:nbd-csi-controller>:/opt/bin/
    ${CMAKE_CURRENT_LIST_DIR}/faults_io_restart.sh
  TIMEOUT 600 LABELS vm faults SERIAL)
