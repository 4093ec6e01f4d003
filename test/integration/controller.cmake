# The controller's tests are registered from test/controller/controller.cmake.

# bench/csi_bench.sh's client (not a test): CreateVolume/CreateSnapshot latency and throughput.
if(TARGET nbdcsi_csi_proto)
  add_executable(csi_bench ${CMAKE_SOURCE_DIR}/bench/csi_bench.cpp)
  target_include_directories(csi_bench PRIVATE ${CMAKE_SOURCE_DIR})
  target_link_libraries(csi_bench PRIVATE nbdcsi_csi_proto gRPC::grpc++ protobuf::libprotobuf)
  set_target_properties(csi_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
endif()
