# `nbdctl cluster nodes|volumes|snapshots` against a real nbd-csi-controller and two real
# nbd-datapathd over mutual TLS: table and JSON, refused clients, a node killed (about 15 s).
nbdcsi_add_test(NAME integration.cluster_view
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/cluster_view.sh TIMEOUT 120 LABELS integration)
# The same with replicated volumes: a real etcd, the controller with --cluster-etcd, CSI
# CreateVolume replicas=2; their replicas, copies, snapshot source and health (about 10 s).
nbdcsi_add_test(NAME integration.cluster_view_replicated
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/cluster_view_replicated.sh TIMEOUT 120 LABELS integration)
