# Attachments (datapath/attach: attachments, kernel_nbd, fuse_attach) without a kernel: the manager
# against a fake kernel and a fake nbdfuse/loop (mode choice, records, Recover, Detach, Resize,
# idempotence, concurrency), the socketpairs the kernel would get, driven by a raw NBD client, and
# nbdctl's rendering. The real scenarios: test/vm/attach.cmake (kernel NBD) and
# test/integration/attach_fuse.cmake (nbdfuse + loop on this host).
nbdcsi_add_gtest(attach_manager_test ${CMAKE_CURRENT_LIST_DIR}/attach_manager_test.cpp nbd_attach
                 nbd_codec nbdcsi_common)
set_property(TEST unit.attach_manager_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_manager_test PROPERTY TIMEOUT 30)
nbdcsi_add_gtest(attach_target_test ${CMAKE_CURRENT_LIST_DIR}/attach_target_test.cpp nbd_attach
                 nbd_codec nbdcsi_common)
set_property(TEST unit.attach_target_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_target_test PROPERTY TIMEOUT 30)
nbdcsi_add_gtest(attach_socketpair_test ${CMAKE_CURRENT_LIST_DIR}/attach_socketpair_test.cpp
                 nbd_attach nbd_engine nbd_pool nbd_codec nbdcsi_common)
set_property(TEST unit.attach_socketpair_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_socketpair_test PROPERTY TIMEOUT 30)
nbdcsi_add_gtest(attach_kernel_test ${CMAKE_CURRENT_LIST_DIR}/attach_kernel_test.cpp nbd_attach
                 nbdcsi_common)
set_property(TEST unit.attach_kernel_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_kernel_test PROPERTY TIMEOUT 30)
nbdcsi_add_gtest(attach_service_test ${CMAKE_CURRENT_LIST_DIR}/attach_service_test.cpp
                 nbd_attach_api nbd_api nbd_attach nbd_engine nbd_pool nbdcsi_common)
set_property(TEST unit.attach_service_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_service_test PROPERTY TIMEOUT 30)
nbdcsi_add_gtest(attach_render_test ${CMAKE_CURRENT_LIST_DIR}/attach_render_test.cpp nbdctl_render)
set_property(TEST unit.attach_render_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_render_test PROPERTY TIMEOUT 30)
# The one rule for /dev/nbdN (and /dev/loopN) names and their count (common/block_devices.h).
nbdcsi_add_gtest(block_devices_test ${CMAKE_CURRENT_LIST_DIR}/block_devices_test.cpp
                 nbdcsi_common)
set_property(TEST unit.block_devices_test APPEND PROPERTY LABELS attach)
