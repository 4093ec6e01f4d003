# Cluster state without etcd: VolumeState JSON, key layout, Lease on the memory store, and the
# ClusterStore contract on MemoryClusterStore (test/support/cluster_store_contract.h).
nbdcsi_add_gtest(cluster_state_test ${CMAKE_CURRENT_LIST_DIR}/cluster_state_test.cpp
                 nbdcsi_cluster)
set_property(TEST unit.cluster_state_test APPEND PROPERTY LABELS cluster)
