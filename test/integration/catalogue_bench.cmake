# bench/catalogue_bench.sh's two programs (not tests): nbdcsi-node-sim, many simulated node
# datapaths in one process, and catalogue_bench, the CSI client that times CreateVolume.
if(TARGET nbdcsi_csi_proto)
  add_executable(nbdcsi-node-sim ${CMAKE_SOURCE_DIR}/bench/node_sim.cpp)
  target_include_directories(nbdcsi-node-sim PRIVATE ${CMAKE_SOURCE_DIR})
  target_link_libraries(nbdcsi-node-sim PRIVATE nbd_api_proto nbdcsi_cluster nbdcsi_common
                        CLI11::CLI11 gRPC::grpc++ protobuf::libprotobuf)
  set_target_properties(nbdcsi-node-sim PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)

  add_executable(catalogue_bench ${CMAKE_SOURCE_DIR}/bench/catalogue_bench.cpp)
  target_include_directories(catalogue_bench PRIVATE ${CMAKE_SOURCE_DIR})
  target_link_libraries(catalogue_bench PRIVATE nbdcsi_csi_proto gRPC::grpc++ protobuf::libprotobuf)
  set_target_properties(catalogue_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
endif()
