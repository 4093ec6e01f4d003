"""The NBD wire constants (from the protocol's spec, doc/proto.md of the NBD project) and the
exact-read helper that the raw-socket tests share: proto_edge.py and faults_clients.py speak the
protocol byte by byte to send what a library would refuse to."""

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698


class Closed(Exception):
    """The peer closed (EOF or reset) before all the bytes asked for arrived."""


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
