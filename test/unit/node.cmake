# The CSI Node service with fake OS and datapath seams (table-driven, no privileges); the gRPC
# DatapathClient against an in-process server (error codes survive the round trip); the real
# LinuxOs on image files and temp dirs (blkid probe, mkfs errors, mount table; tmpfs mounts and
# read-only binds when run as root).
if(TARGET nbdcsi_node)
  nbdcsi_add_gtest(node_service_test ${CMAKE_CURRENT_LIST_DIR}/node_service_test.cpp nbdcsi_node)
  nbdcsi_add_gtest(node_datapath_client_test ${CMAKE_CURRENT_LIST_DIR}/node_datapath_client_test.cpp
                   nbdcsi_node)
  nbdcsi_add_gtest(node_linux_os_test ${CMAKE_CURRENT_LIST_DIR}/node_linux_os_test.cpp nbdcsi_node)
endif()
