# nbd-csi-controller acceptance (issue 4): gtest binaries that run the real controller and two or
# three real nbd-datapathd processes on loopback and drive every CSI Controller RPC over gRPC.
# Each needs the three binaries built; each takes seconds.
if(TARGET nbd-csi-controller AND TARGET nbd-datapathd AND TARGET nbdctl)
  add_library(nbdcsi_controller_test_cluster STATIC ${CMAKE_SOURCE_DIR}/test/controller/cluster.cpp)
  target_include_directories(nbdcsi_controller_test_cluster PUBLIC ${CMAKE_SOURCE_DIR})
  target_link_libraries(nbdcsi_controller_test_cluster PUBLIC nbdcsi_csi_proto nbd_api_proto
                        gRPC::grpc++ protobuf::libprotobuf)

  foreach(t controller_acceptance_test controller_sanity_test controller_tls_test)
    if(EXISTS ${CMAKE_SOURCE_DIR}/test/controller/${t}.cpp)
      add_executable(${t} ${CMAKE_SOURCE_DIR}/test/controller/${t}.cpp)
      target_link_libraries(${t} PRIVATE nbdcsi_controller_test_cluster nlohmann_json::nlohmann_json
                            GTest::gtest_main GTest::gmock)
      set_target_properties(${t} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin)
      add_dependencies(${t} nbd-csi-controller nbd-datapathd nbdctl)
      nbdcsi_add_test(NAME integration.${t} COMMAND ${t} TIMEOUT 180 LABELS integration)
    endif()
  endforeach()
endif()

# The controller's pure pieces (sizes, page tokens): a plain unit test.
if(TARGET nbdcsi_controller)
  nbdcsi_add_gtest(controller_unit_test ${CMAKE_SOURCE_DIR}/test/controller/controller_unit_test.cpp
                   nbdcsi_controller)
endif()

# bench/csi_bench.sh's client (not a test): CreateVolume/CreateSnapshot latency and throughput.
if(TARGET nbdcsi_csi_proto)
  add_executable(csi_bench ${CMAKE_SOURCE_DIR}/bench/csi_bench.cpp)
  target_include_directories(csi_bench PRIVATE ${CMAKE_SOURCE_DIR})
  target_link_libraries(csi_bench PRIVATE nbdcsi_csi_proto gRPC::grpc++ protobuf::libprotobuf)
  set_target_properties(csi_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
endif()
