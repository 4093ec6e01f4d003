# The replica client (datapath/replica): its reply parser byte by byte, and the client against a
# scripted fake server on a Unix socket (handshake by the project's own nbd::Negotiator, the
# transmission phase scripted per test: chunks out of order, holes, errors, every protocol
# violation, a peer that closes or falls silent).
nbdcsi_add_gtest(replica_client_test ${CMAKE_CURRENT_LIST_DIR}/replica_client_test.cpp
                 nbd_replica_client)
