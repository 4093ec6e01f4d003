# Kernel NBD attachment by nbd-datapathd itself (generic netlink over socketpairs) and its restart
# resilience: kill -9 of the daemon twice under fio with verify on a mounted ext4, each restart
# reconnecting the device with NBD_CMD_RECONFIGURE; no I/O error may reach the file system. Runs in
# the project's VM (test/vm/nbd-kernel-vm, see vm.cmake for when it skips). SERIAL: the VM uses
# both cores.
# An ASan+UBSan build's binaries are ~500 MB even without debug sections (UBSan's static data for
# every check and its relocations), and the guest holds them in RAM twice while its initramfs
# unpacks: that build gets more memory (CI runs this test from build-asan, test/sanitize.cmake).
if(NBDCSI_SANITIZE)
  set(_attach_restart_mem 3072)
else()
  set(_attach_restart_mem 1536)
endif()
nbdcsi_add_test(NAME vm.attach_restart
  COMMAND ${CMAKE_CURRENT_LIST_DIR}/nbd-kernel-vm --timeout 540 --mem ${_attach_restart_mem}
    --file ${CMAKE_CURRENT_LIST_DIR}/lib.sh:/opt/lib/nbdcsi-vm.sh
    --file $<TARGET_FILE:nbd-datapathd>:/opt/bin/
    --file $<TARGET_FILE:nbdctl>:/opt/bin/
    ${CMAKE_CURRENT_LIST_DIR}/attach_restart.sh
  TIMEOUT 600 LABELS vm attach SERIAL)
# Online resize of a kernel NBD attachment with ext4 mounted: volume resize, ResizeAttachment
# (RECONFIGURE with NBD_ATTR_SIZE_BYTES; /sys/block/nbdN/size must follow), resize2fs, df.
nbdcsi_add_test(NAME vm.attach_resize
  COMMAND ${CMAKE_CURRENT_LIST_DIR}/nbd-kernel-vm --timeout 300 --mem 1280
    --file ${CMAKE_CURRENT_LIST_DIR}/lib.sh:/opt/lib/nbdcsi-vm.sh
    --file $<TARGET_FILE:nbd-datapathd>:/opt/bin/
    --file $<TARGET_FILE:nbdctl>:/opt/bin/
    ${CMAKE_CURRENT_LIST_DIR}/attach_resize.sh
  TIMEOUT 360 LABELS vm attach SERIAL)
# A node that does not load nbd.ko at boot: --require-kernel-nbd refuses to start, the chart's
# load-nbd init container script loads it, and the datapath then attaches through /dev/nbdN
# (kernel_nbd_load_run.sh renders the script with helm and boots the VM with --no-nbd).
nbdcsi_add_test(NAME vm.kernel_nbd_load
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/kernel_nbd_load_run.sh
  TIMEOUT 480 LABELS vm attach SERIAL)
