# The CSI Node service with fake OS and datapath seams (table-driven, no privileges), and the
# real LinuxOs on image files (probe, mkfs, offline grow; mounts are left to the integration test).
if(TARGET nbdcsi_node)
  nbdcsi_add_gtest(node_service_test ${CMAKE_CURRENT_LIST_DIR}/node_service_test.cpp nbdcsi_node)
  nbdcsi_add_gtest(node_linux_os_test ${CMAKE_CURRENT_LIST_DIR}/node_linux_os_test.cpp nbdcsi_node)
endif()
