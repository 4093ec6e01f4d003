# The kubelet sequence on this machine's kernel: real nbd-datapathd (nbdfuse + loop fallback) and
# real nbd-csi-node, driven over the CSI socket by a gtest client. Needs root, /dev/fuse, loop
# devices and nbdfuse (exit 77 otherwise, unless CI=true). Serial: it makes mounts and loop
# devices and runs mkfs, ~20 s on two cores.
if(TARGET nbdcsi_csi_proto AND TARGET nbd_api_proto)
  add_executable(node_fuse_test ${CMAKE_CURRENT_LIST_DIR}/node_fuse_test.cpp)
  target_include_directories(node_fuse_test PRIVATE ${CMAKE_SOURCE_DIR})
  target_link_libraries(node_fuse_test PRIVATE nbdcsi_csi_proto nbd_api_proto GTest::gtest
                        gRPC::grpc++ protobuf::libprotobuf)
  set_target_properties(node_fuse_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin)
  nbdcsi_add_test(NAME integration.node_fuse COMMAND node_fuse_test
    TIMEOUT 300 LABELS integration SERIAL)
endif()
