# The replicated target (datapath/replica Target + ReplicaSet) against a real etcd (127.0.0.22)
# and two nbd-datapathd replica nodes on 127.0.0.11/.12 with mutual TLS: a replica killed under
# writes (dropped in etcd, nothing acknowledged lost, checked with nbdcopy), a stale target
# fenced after a second target claimed, an unreachable replica dropped before serving, a CSI
# snapshot at one write boundary (freeze, snapshot, thaw), replica moves (nbdctl target move and
# nbdctl cluster volume move under fio, bad input, a new node killed mid-copy).
if(TARGET nbd-datapathd AND TARGET nbdctl AND TARGET nbd-csi-controller)
  add_executable(replicated_target_it ${CMAKE_CURRENT_LIST_DIR}/replicated_target_it.cpp)
  target_link_libraries(replicated_target_it PRIVATE nbd_replica nlohmann_json::nlohmann_json
                        nbdcsi_csi_proto nbd_api_proto nbdcsi_controller_test_requests
                        GTest::gtest_main)
  set_target_properties(replicated_target_it PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                        ${CMAKE_BINARY_DIR}/test-bin)
  add_dependencies(replicated_target_it nbd-datapathd nbdctl nbd-csi-controller)
  nbdcsi_add_test(NAME integration.replicated_target COMMAND replicated_target_it
    TIMEOUT 600 LABELS integration cluster tls)
endif()
