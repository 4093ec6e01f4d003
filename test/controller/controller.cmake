# The controller's tests, all labelled `controller` (ctest -L controller):
# - unit (label unit too): controller_unit_test (pure pieces and the gRPC datapath client against
#   an in-process server) and controller_decisions_test (every decision in
#   controller/controller_service.h, against fake datapaths behind a real NodeRegistry). No child
#   processes; each runs in well under a second.
# - integration (issue 4): gtest binaries that run the real controller and two or three real
#   nbd-datapathd processes on loopback and drive every CSI Controller RPC over gRPC. Each needs
#   the three binaries built; each takes seconds. Issue 12 adds node binding and certificate
#   refusals (node_identity_test), gRPC certificate rotation under live I/O
#   (tls_rotation_test) and hostile names and ids (pool_escape_test).
add_library(nbdcsi_controller_test_requests STATIC ${CMAKE_CURRENT_LIST_DIR}/csi_requests.cpp)
target_include_directories(nbdcsi_controller_test_requests PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(nbdcsi_controller_test_requests PUBLIC nbdcsi_csi_proto)

if(TARGET nbdcsi_controller)
  add_library(nbdcsi_controller_fakes STATIC ${CMAKE_CURRENT_LIST_DIR}/fake_datapath.cpp)
  target_link_libraries(nbdcsi_controller_fakes PUBLIC nbdcsi_controller)
  nbdcsi_add_gtest(controller_unit_test ${CMAKE_CURRENT_LIST_DIR}/controller_unit_test.cpp
                   nbdcsi_controller)
  nbdcsi_add_gtest(controller_decisions_test
                   ${CMAKE_CURRENT_LIST_DIR}/controller_decisions_test.cpp
                   nbdcsi_controller_fakes nbdcsi_controller_test_requests)
  # Replicated volumes (issue 16): the catalogue in the in-memory cluster store.
  nbdcsi_add_gtest(controller_replicated_test
                   ${CMAKE_CURRENT_LIST_DIR}/replicated_test.cpp
                   nbdcsi_controller_fakes nbdcsi_controller_test_requests)
  # Backup snapshots and restores (issue 18): the controller's decisions over a fake bucket.
  nbdcsi_add_gtest(controller_backups_test
                   ${CMAKE_CURRENT_LIST_DIR}/backups_test.cpp
                   nbdcsi_controller_fakes nbdcsi_controller_test_requests)
  # `nbdctl cluster`'s ClusterView service over fakes: all nodes answer, one down or expired,
  # replicated volumes from the catalogue.
  nbdcsi_add_gtest(controller_cluster_view_test
                   ${CMAKE_CURRENT_LIST_DIR}/cluster_view_test.cpp nbdcsi_controller_fakes)
  # `nbdctl cluster volume move|replica`'s orchestration (controller/replica_changes.h) over fakes
  # and the memory catalogue: refusals, and the changes made with no target.
  nbdcsi_add_gtest(controller_replica_changes_test
                   ${CMAKE_CURRENT_LIST_DIR}/replica_changes_test.cpp nbdcsi_controller_fakes)
  set_property(TEST unit.controller_unit_test unit.controller_decisions_test
               unit.controller_replicated_test unit.controller_cluster_view_test
               unit.controller_replica_changes_test
               unit.controller_backups_test
               APPEND PROPERTY LABELS controller)
endif()

if(TARGET nbd-csi-controller AND TARGET nbd-datapathd AND TARGET nbdctl)
  add_library(nbdcsi_controller_test_cluster STATIC ${CMAKE_CURRENT_LIST_DIR}/cluster.cpp)
  target_include_directories(nbdcsi_controller_test_cluster PUBLIC ${CMAKE_SOURCE_DIR})
  target_link_libraries(nbdcsi_controller_test_cluster PUBLIC nbdcsi_controller_test_requests
                        nbd_api_proto gRPC::grpc++ protobuf::libprotobuf)

  foreach(t controller_acceptance_test controller_sanity_test controller_tls_test
          node_identity_test tls_rotation_test pool_escape_test)
    add_executable(${t} ${CMAKE_CURRENT_LIST_DIR}/${t}.cpp)
    target_link_libraries(${t} PRIVATE nbdcsi_controller_test_cluster nlohmann_json::nlohmann_json
                          GTest::gtest_main GTest::gmock)
    set_target_properties(${t} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin)
    add_dependencies(${t} nbd-csi-controller nbd-datapathd nbdctl)
    nbdcsi_add_test(NAME integration.${t} COMMAND ${t} TIMEOUT 180 LABELS integration controller)
  endforeach()
endif()

# No secrets in logs: a full flow through the three daemons with secrets in every CSI call that
# takes them and TLS keys on disk, then every log searched (issue 12). Stages a volume, so it
# needs root and the node plugin's tools (exit 77 otherwise, unless CI=true). Serial: mounts.
if(TARGET nbd-csi-controller AND TARGET nbd-datapathd AND TARGET nbd-csi-node)
  add_executable(secrets_log_test ${CMAKE_CURRENT_LIST_DIR}/secrets_log_test.cpp)
  target_link_libraries(secrets_log_test PRIVATE nbdcsi_controller_test_cluster GTest::gtest)
  set_target_properties(secrets_log_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                        ${CMAKE_BINARY_DIR}/test-bin)
  add_dependencies(secrets_log_test nbd-csi-controller nbd-datapathd nbd-csi-node)
  nbdcsi_add_test(NAME integration.secrets_log_test COMMAND secrets_log_test TIMEOUT 180
                  LABELS integration controller SERIAL)
endif()
