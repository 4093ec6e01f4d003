# The replicated target's fan-out (datapath/replica/replica_set.h) against fake replica channels
# and a fake membership (held, failing), plus ClusterMembership on the memory cluster store.
nbdcsi_add_gtest(replica_set_test ${CMAKE_CURRENT_LIST_DIR}/replica_set_test.cpp nbd_replica)
# The cluster agent (datapath/replica/cluster_agent.h) on the memory store: registration, refusals
# that leave no claim and no export, a lost lease.
nbdcsi_add_gtest(cluster_agent_test ${CMAKE_CURRENT_LIST_DIR}/cluster_agent_test.cpp nbd_replica)
