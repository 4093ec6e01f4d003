# Management API, nbdctl rendering, Kubernetes quantities and endpoints.
nbdcsi_add_gtest(quantity_test ${CMAKE_CURRENT_LIST_DIR}/quantity_test.cpp nbdcsi_common)
nbdcsi_add_gtest(endpoint_test ${CMAKE_CURRENT_LIST_DIR}/endpoint_test.cpp nbdcsi_common)
nbdcsi_add_gtest(api_service_test ${CMAKE_CURRENT_LIST_DIR}/api_service_test.cpp nbd_api)
nbdcsi_add_gtest(api_nbdctl_render_test ${CMAKE_CURRENT_LIST_DIR}/api_nbdctl_render_test.cpp
                 nbdctl_render)
# Cron expressions and volume schedules (common/cron.h, common/volume_schedule.h).
nbdcsi_add_gtest(cron_test ${CMAKE_CURRENT_LIST_DIR}/cron_test.cpp nbdcsi_common)
