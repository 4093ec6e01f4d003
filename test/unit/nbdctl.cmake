# nbdctl's command table (tools/nbdctl/command_tree.h). Its rendering is checked by
# api_nbdctl_render_test and attach_render_test, `nbdctl csi` end to end by nbdctl_csi_test, and
# the datapath commands against a real daemon by integration.nbdctl_cli.
nbdcsi_add_gtest(nbdctl_command_tree_test ${CMAKE_CURRENT_LIST_DIR}/nbdctl_command_tree_test.cpp
                 nbdctl_commands)
# `nbdctl --wait` progress lines (tools/nbdctl/progress.h): pure, with a fixed clock.
nbdcsi_add_gtest(nbdctl_progress_test ${CMAKE_CURRENT_LIST_DIR}/nbdctl_progress_test.cpp
                 nbdctl_render)
# `nbdctl target` rendering (tools/nbdctl/target_render.h): health, JSON keys, details, table.
nbdcsi_add_gtest(target_render_test ${CMAKE_CURRENT_LIST_DIR}/target_render_test.cpp
                 nbdctl_render)
# `nbdctl log-level` rendering (tools/nbdctl/logging_render.h): text with the pending revert, JSON.
nbdcsi_add_gtest(logging_render_test ${CMAKE_CURRENT_LIST_DIR}/logging_render_test.cpp
                 nbdctl_render)
# `nbdctl cluster` rendering (tools/nbdctl/cluster_render.h): JSON keys, tables, silent nodes.
nbdcsi_add_gtest(cluster_render_test ${CMAKE_CURRENT_LIST_DIR}/cluster_render_test.cpp
                 nbdctl_render)
