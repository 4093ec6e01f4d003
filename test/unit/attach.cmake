# Kernel NBD attachments (datapath/engine/attachments, kernel_nbd) without a kernel: the manager
# against a fake kernel (records, Recover, Detach, idempotence, concurrency), and the socketpairs
# the kernel would get, driven by a raw NBD client. The real-kernel scenario is test/vm/attach.cmake.
nbdcsi_add_gtest(attach_manager_test ${CMAKE_CURRENT_LIST_DIR}/attach_manager_test.cpp nbd_engine
                 nbd_codec nbdcsi_common)
set_property(TEST unit.attach_manager_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_manager_test PROPERTY TIMEOUT 30)
nbdcsi_add_gtest(attach_socketpair_test ${CMAKE_CURRENT_LIST_DIR}/attach_socketpair_test.cpp
                 nbd_engine nbd_pool nbd_codec nbdcsi_common)
set_property(TEST unit.attach_socketpair_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_socketpair_test PROPERTY TIMEOUT 30)
nbdcsi_add_gtest(attach_kernel_test ${CMAKE_CURRENT_LIST_DIR}/attach_kernel_test.cpp nbd_engine
                 nbdcsi_common)
set_property(TEST unit.attach_kernel_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_kernel_test PROPERTY TIMEOUT 30)
nbdcsi_add_gtest(attach_service_test ${CMAKE_CURRENT_LIST_DIR}/attach_service_test.cpp
                 nbd_attach_api nbd_api nbd_engine nbd_pool nbdcsi_common)
set_property(TEST unit.attach_service_test APPEND PROPERTY LABELS attach)
set_property(TEST unit.attach_service_test PROPERTY TIMEOUT 30)
