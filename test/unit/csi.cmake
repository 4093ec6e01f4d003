# csi/: the shared CSI code (ids, StorageClass parameters, redaction + logging interceptor,
# StartCsiServer, Identity) and the `nbdctl csi` client against an in-test CSI server.
if(TARGET nbdcsi_csi)
  nbdcsi_add_gtest(csi_ids_test ${CMAKE_CURRENT_LIST_DIR}/csi_ids_test.cpp nbdcsi_csi)
  nbdcsi_add_gtest(csi_params_test ${CMAKE_CURRENT_LIST_DIR}/csi_params_test.cpp nbdcsi_csi)
  nbdcsi_add_gtest(csi_logging_test ${CMAKE_CURRENT_LIST_DIR}/csi_logging_test.cpp nbdcsi_csi)
  nbdcsi_add_gtest(csi_server_test ${CMAKE_CURRENT_LIST_DIR}/csi_server_test.cpp nbdcsi_csi)
  if(TARGET nbdctl)
    nbdcsi_add_gtest(nbdctl_csi_test ${CMAKE_CURRENT_LIST_DIR}/nbdctl_csi_test.cpp nbdcsi_csi
                     nlohmann_json::nlohmann_json)
    add_dependencies(nbdctl_csi_test nbdctl)
  endif()
endif()
