# `nbdctl cluster nodes|volumes|snapshots` against a real nbd-csi-controller and two real
# nbd-datapathd over mutual TLS: table and JSON, refused clients, a node killed (about 15 s).
nbdcsi_add_test(NAME integration.cluster_view
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/cluster_view.sh TIMEOUT 120 LABELS integration)
