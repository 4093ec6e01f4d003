# Restores and clones across nodes (issue 16): a real nbd-csi-controller and two real
# nbd-datapathd on 127.0.0.2 and 127.0.0.3, mutual TLS for gRPC and NBD; a 1 GiB snapshot
# restored onto the node that does not hold it (byte-identical, throughput printed), a sparse
# clone, idempotency, the source node killed (UNAVAILABLE, nothing left). About 30 s.
nbdcsi_add_test(NAME integration.xnode_restore
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/xnode_restore.sh TIMEOUT 240 LABELS integration controller)
