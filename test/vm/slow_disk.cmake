# Slow-disk isolation (test/vm/slow_disk.sh): the pool's file system on dm-delay with slow writes and
# fast reads; a QD32 writer on one kernel-attached volume must not raise the QD1 read latency of
# another volume served by the same (single) io_uring worker. SERIAL: the VM uses both cores, and the
# latency figures need them.
nbdcsi_add_test(NAME vm.slow_disk
  COMMAND ${CMAKE_CURRENT_LIST_DIR}/nbd-kernel-vm --timeout 300 --mem 1536 --modules dm-delay
    --file ${CMAKE_CURRENT_LIST_DIR}/lib.sh:/opt/lib/nbdcsi-vm.sh
    --file $<TARGET_FILE:nbd-datapathd>:/opt/bin/
    --file $<TARGET_FILE:nbdctl>:/opt/bin/
    ${CMAKE_CURRENT_LIST_DIR}/slow_disk.sh
  TIMEOUT 360 LABELS vm SERIAL)
