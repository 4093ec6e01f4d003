# Real-kernel tests: nbd-datapathd served to the kernel's own NBD client (nbd.ko) inside a QEMU VM
# booted from Debian's kernel (test/vm/nbd-kernel-vm), because CI hosts and containers usually
# have no nbd module. Needs root; the runner apt-installs qemu, the kernel and the guest tools it
# lacks, and exits 77 (skipped) only when it truly cannot run (not root, or apt-get fails) and
# neither CI=true nor NBDVM_REQUIRE=1 is set. SERIAL: the VM uses both cores.
#
# Only the two binaries the script needs are shipped (with their shared libraries), so the test
# does not depend on whatever else is in bin/. The runner's own limit (540 s) is below CTest's
# so that a hang is reported by the runner, with the console output, not just killed.
set(_vm ${CMAKE_CURRENT_LIST_DIR})

nbdcsi_add_test(NAME vm.datapath_kernel
  COMMAND ${_vm}/nbd-kernel-vm --timeout 540 --mem 1536
    --file ${CMAKE_CURRENT_LIST_DIR}/lib.sh:/opt/lib/nbdcsi-vm.sh
    --file $<TARGET_FILE:nbd-datapathd>:/opt/bin/
    --file $<TARGET_FILE:nbdctl>:/opt/bin/
    ${_vm}/datapath_kernel.sh
  TIMEOUT 600 LABELS vm SERIAL)
