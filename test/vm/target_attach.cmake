# The kernel NBD device on a replicated volume's target (issue 16), in the VM: etcd, two replica
# datapaths with TLS node certificates and a target datapath, `nbdctl attach --target`, ext4 and
# fio with verify on /dev/nbdN while one replica is killed with -9 (cluster_run.sh makes
# the certificates on the host and ships etcd into the VM). SERIAL: the VM uses both cores.
nbdcsi_add_test(NAME vm.target_attach
  COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/cluster_run.sh 280 ${CMAKE_CURRENT_LIST_DIR}/target_attach.sh
    $<TARGET_FILE:nbd-datapathd> $<TARGET_FILE:nbdctl> $<TARGET_FILE:nbdcsi-cluster-tool>
  TIMEOUT 300 LABELS vm attach SERIAL)
