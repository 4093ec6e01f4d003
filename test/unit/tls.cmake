# Mutual TLS between controller and datapaths: credentials from files, node ids and host:port
# checks, and the API server's TCP listener (good certificate in; other CA, no certificate and
# plaintext out; Datapath service only). Certificates: test/tls/make-certs.sh into a temp dir.
nbdcsi_add_gtest(tls_test ${CMAKE_CURRENT_LIST_DIR}/tls_test.cpp nbd_api)
