# The cluster state (common/cluster) against a real etcd that the test starts on 127.0.0.21 and
# kills: the ClusterStore contract, racing claims, real lease expiry and fencing, keepalives, etcd
# down and restarted. Exits 77 without an etcd binary (unless CI=true). ~25 s.
add_executable(etcd_cluster_test ${CMAKE_CURRENT_LIST_DIR}/etcd_cluster_test.cpp)
target_link_libraries(etcd_cluster_test PRIVATE nbdcsi_cluster GTest::gtest)
set_target_properties(etcd_cluster_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/test-bin)
nbdcsi_add_test(NAME integration.etcd_cluster COMMAND etcd_cluster_test
  TIMEOUT 180 LABELS integration cluster)
