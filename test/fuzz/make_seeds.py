#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into test/fuzz/corpus/<target>/ (committed to the
repository; rerun after changing a seed here). Seeds are valid and near-valid inputs in each
target's input layout (documented at the top of <target>_fuzz.cpp), so the fuzzer starts from
inputs that reach the accepting paths instead of having to discover magics, JSON keys and
protobuf tags. Reproducers of fixed bugs are added to the corpus directories by hand (named
crash-<what>) and are not touched here.

usage: make_seeds.py [CORPUS_DIR]   (default: corpus/ next to this script)
"""
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_nbd_seeds as nbd  # noqa: E402


# ---- protobuf wire format, enough for the datapath API's requests ----
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_int(field, n):
    return varint(field << 3) + varint(n)


def pb_bytes(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def qos(**kw):
    order = ["max_iops", "max_read_iops", "max_write_iops", "max_bps", "max_read_bps",
             "max_write_bps", "iops_per_gib", "bps_per_gib", "burst_ms"]
    return b"".join(pb_int(order.index(k) + 1, v) for k, v in kw.items())


OPS = ["CreateVolume", "DeleteVolume", "ResizeVolume", "GetVolume", "GetVolumeStats", "SetQos",
       "CreateSnapshot", "DeleteSnapshot", "GetSnapshot", "ListSnapshots", "ListVolumes"]


def call(op, msg=b""):
    return bytes([OPS.index(op)]) + struct.pack(">H", len(msg)) + msg


def create(name, size, q=b"", read_only=False, snapshot=None, volume=None):
    m = pb_bytes(1, name) + pb_int(2, size)
    if q:
        m += pb_bytes(3, q)
    if read_only:
        m += pb_int(4, 1)
    if snapshot is not None:
        m += pb_bytes(16, pb_bytes(1, snapshot))
    if volume is not None:
        m += pb_bytes(16, pb_bytes(2, volume))
    return call("CreateVolume", m)


def named(op, name):
    return call(op, pb_bytes(1, name))


MiB = 1 << 20
API = {
    "lifecycle": create("vol-a", MiB, qos(max_iops=100, burst_ms=200)) + named("GetVolume", "vol-a")
    + call("ResizeVolume", pb_bytes(1, "vol-a") + pb_int(2, 2 * MiB))
    + call("SetQos", pb_bytes(1, "vol-a") + pb_bytes(2, qos(max_bps=10 * MiB)))
    + call("SetQos", pb_bytes(1, "vol-a") + pb_bytes(3, qos(iops_per_gib=5)))
    + named("GetVolumeStats", "vol-a") + call("ListVolumes") + named("DeleteVolume", "vol-a")
    + named("GetVolume", "vol-a"),
    "snapshots": create("vol-a", MiB) + call("CreateSnapshot", pb_bytes(1, "snap-a") + pb_bytes(2, "vol-a"))
    + create("vol-b", 0, snapshot="snap-a") + create("vol-c", 2 * MiB, volume="vol-a")
    + call("ListSnapshots", pb_bytes(1, "vol-a")) + named("GetSnapshot", "snap-a")
    + named("DeleteSnapshot", "snap-a") + named("DeleteVolume", "vol-a"),
    "idempotent": create("v", 4096, read_only=True) + create("v", 4096, read_only=True)
    + create("v", 8192) + create("v", 4096, qos(max_iops=1), read_only=True),
    "bad_names": create("../etc", 4096) + create("a/b", 4096) + create(".hidden", 4096)
    + create("-x", 4096) + create("n" * 129, 4096) + create("nul\0x", 4096)
    + named("DeleteVolume", "../../x") + named("GetSnapshot", "a b") + create("", 4096),
    "bad_sizes": create("s0", 0) + create("s1", 4097) + create("s2", 1 << 63) + create("s3", 1 << 62)
    + call("ResizeVolume", pb_bytes(1, "s3") + pb_int(2, 1)),
    "bad_qos": create("q1", MiB, qos(burst_ms=60001))
    + create("q2", 1 << 40, qos(iops_per_gib=1 << 60)) + create("q3", MiB, qos(bps_per_gib=(1 << 64) - 1))
    + create("q4", MiB) + call("SetQos", pb_bytes(1, "q4") + pb_bytes(3, qos(burst_ms=70000)))
    + call("SetQos", pb_bytes(1, "q4")),
    "bad_sources": create("r1", 0, snapshot="missing") + create("r2", 0, volume="r2")
    + call("CreateVolume", pb_bytes(1, "r3") + pb_bytes(16, b"")) + create("r4", 0, snapshot="../x"),
}

# ---- pool metadata, as ToJson writes it ----
def vol_meta(name, size=MiB, **kw):
    m = {"version": 1, "name": name, "size": size, "created_unix_ns": 1700000000000000000,
         "read_only": False,
         "qos": {"max_iops": 0, "max_read_iops": 0, "max_write_iops": 0, "max_bps": 0,
                 "max_read_bps": 0, "max_write_bps": 0, "iops_per_gib": 0, "bps_per_gib": 0,
                 "burst_ms": 0},
         "source": "", "state": "ready"}
    m.update(kw)
    return json.dumps(m, indent=2) + "\n"


def snap_meta(name, source="vol-a", size=MiB, **kw):
    m = {"version": 1, "name": name, "source_volume": source, "size": size,
         "created_unix_ns": 1700000000000000000, "method": "copy", "state": "ready"}
    m.update(kw)
    return json.dumps(m, indent=2) + "\n"


def meta_seed(kind, name, text):
    return bytes([kind]) + name.encode() + b"\n" + text.encode()


full = vol_meta("vol-a")
META = {
    "volume": meta_seed(0, "vol-a", full),
    "volume_qos": meta_seed(0, "vol-q", vol_meta("vol-q", 3 << 30, qos={
        "max_iops": 100, "max_bps": 1 << 20, "iops_per_gib": 3, "burst_ms": 500}, read_only=True)),
    "volume_restoring": meta_seed(0, "vol-r", vol_meta("vol-r", source="snapshot/good", state="copying")),
    "volume_clone_failed": meta_seed(0, "vol-c", vol_meta("vol-c", source="volume/vol-a", state="failed",
                                                          error="copy failed: EIO")),
    "volume_old_format": meta_seed(0, "old", '{"version": 1, "name": "old", "size": 4096}'),
    "volume_truncated": meta_seed(0, "vol-a", full[: len(full) // 2]),
    "volume_other_name": meta_seed(0, "vol-b", full),
    "volume_version2": meta_seed(0, "vol-a", full.replace('"version": 1', '"version": 2')),
    "volume_bad_size": meta_seed(0, "vol-a", full.replace(str(MiB), "4097")),
    "volume_huge_size": meta_seed(0, "vol-a", full.replace(str(MiB), str(1 << 63))),
    "volume_negative_size": meta_seed(0, "vol-a", full.replace(str(MiB), "-4096")),
    "volume_float_size": meta_seed(0, "vol-a", full.replace(str(MiB), "4096.0")),
    "volume_qos_overflow": meta_seed(0, "vol-a", vol_meta("vol-a", 1 << 40, qos={"iops_per_gib": 1 << 60})),
    "volume_bad_source": meta_seed(0, "vol-a", vol_meta("vol-a", source="snapshot/../x")),
    "volume_empty": meta_seed(0, "vol-a", ""),
    "volume_array": meta_seed(0, "vol-a", "[1, 2, 3]"),
    "volume_nul_name": meta_seed(0, "vol-a", full.replace('"vol-a"', '"vol-a\\u0000"')),
    "snapshot": meta_seed(1, "snap-a", snap_meta("snap-a")),
    "snapshot_reflink_failed": meta_seed(1, "snap-b", snap_meta("snap-b", method="reflink", state="failed",
                                                                error="x")),
    "snapshot_copying": meta_seed(1, "snap-c", snap_meta("snap-c", state="copying")),
    "snapshot_bad_method": meta_seed(1, "snap-a", snap_meta("snap-a", method="rsync")),
    "snapshot_missing_state": meta_seed(1, "snap-a", '{"version":1,"name":"snap-a","source_volume":"v",'
                                        '"size":4096,"method":"copy"}'),
}
# pool_load's first byte also says whether NAME.img exists (bit 1 set: it does not).
LOAD = dict(META)
LOAD.update({
    "volume_no_data": bytes([2]) + META["volume"][1:],
    "snapshot_no_data": bytes([3]) + META["snapshot"][1:],
    "snapshot_copying_no_data": bytes([3]) + META["snapshot_copying"][1:],
    "volume_bad_file_name": meta_seed(0, "a b", vol_meta("a b")),
})

IDS = {
    "volume_id": b"v1:node-a:pvc-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",
    "snapshot_id": b"s1:worker-1.example.com:snapshot-0b1c2d3e",
    "hashed_name": b"h-0123456789abcdef0123456789abcdef",
    "node_name": b"node-a:vol.1_x",
    "extra_colon": b"v1:node-a:name:more",
    "empty_node": b"v1::name",
    "upper_node": b"v1:Node-A:name",
    "dot_name": b"s1:node:.hidden",
    "traversal": b"v1:node:../../etc/passwd",
    "long_node": b"v1:" + b"a" * 254 + b":x",
    "long_name": b"v1:n:" + b"x" * 65,
    "control": b"v1:node\n:na\x01me\x7f",
    "csi_name": b"pvc-5f0c3a52-3b4e-4d1e-9a4c-0e1f2a3b4c5d",
    "utf8": "v1:node:vol\u00e9".encode(),
}

QOS = {
    "storage_class": b"maxIops=1000\nmaxReadIops=500\nmaxWriteIops=400\nmaxBps=100Mi\n"
    b"maxReadBps=1G\nmaxWriteBps=1.5Gi\niopsPerGiB=10\nbpsPerGiB=1e6\nburstMs=250\n"
    b"csi.storage.k8s.io/fstype=xfs",
    "modify": b"maxIops=100\n---\nmaxIops=0\nburstMs=60000",
    "vac_only": b"---\nmaxBps=5E-1k\nbpsPerGiB=+0.5Ki",
    "quantities": b"maxBps=1Ei\nmaxReadBps=18446744073709551615\nmaxWriteBps=16Ei",
    "unknown_key": b"maxIOPS=100",
    "suffix_on_iops": b"maxIops=10k",
    "burst_too_big": b"burstMs=4294967296",
    "fraction": b"maxBps=0.1Ki",
    "exponent": b"maxBps=1e19\n---\nmaxBps=1e-3k",
    "space": b"maxBps= 1Mi",
    "signs": b"maxIops=+5\n---\nmaxBps=-1",
    "hints": b"maxBps=1K\nmaxReadBps=1MB\nmaxWriteBps=1MiB",
    "empty_value": b"maxIops=\n---\nburstMs",
}


def write(corpus, target, seeds):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def main():
    corpus = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus")
    write(corpus, "nbd_codec", nbd.SEEDS)
    negotiate = dict(nbd.SEEDS)
    negotiate.update({
        "alias_meta_go": nbd.flags(1) + nbd.opt(nbd.OPT_STRUCTURED_REPLY)
        + nbd.opt(nbd.OPT_SET_META, nbd.meta("alias", ["base:allocation"]))
        + nbd.opt(nbd.OPT_GO, nbd.info("", (1, 2))),
        "meta_other_export": nbd.flags(1) + nbd.opt(nbd.OPT_STRUCTURED_REPLY)
        + nbd.opt(nbd.OPT_SET_META, nbd.meta("ro", ["base:allocation"]))
        + nbd.opt(nbd.OPT_GO, nbd.info("disk0")),
        "meta_cleared": nbd.flags(1) + nbd.opt(nbd.OPT_STRUCTURED_REPLY)
        + nbd.opt(nbd.OPT_SET_META, nbd.meta("disk0", ["base:allocation"]))
        + nbd.opt(nbd.OPT_SET_META, nbd.meta("disk0", ["qemu:dirty-bitmap:x"]))
        + nbd.opt(nbd.OPT_EXPORT_NAME, b"alias"),
        "info_descriptions": nbd.flags(3) + nbd.opt(nbd.OPT_INFO, nbd.info("big", (1, 2, 3, 0, 99)))
        + nbd.opt(nbd.OPT_INFO, nbd.info("disk0", (2,))) + nbd.opt(nbd.OPT_INFO, nbd.info("ro", (2, 1)))
        + nbd.opt(nbd.OPT_LIST, b"x") + nbd.opt(nbd.OPT_STRUCTURED_REPLY, b"x")
        + nbd.opt(4) + nbd.opt(nbd.OPT_GO, nbd.info("nul\0")),
        "meta_before_structured": nbd.flags(1) + nbd.opt(nbd.OPT_LIST_META, nbd.meta("disk0", []))
        + nbd.opt(nbd.OPT_STRUCTURED_REPLY) + nbd.opt(nbd.OPT_LIST_META, nbd.meta("disk0", []))
        + nbd.opt(nbd.OPT_LIST_META, nbd.meta("nope", ["base:"])) + nbd.opt(nbd.OPT_ABORT),
    })
    write(corpus, "nbd_negotiate", negotiate)
    write(corpus, "api_request", API)
    write(corpus, "pool_metadata", META)
    write(corpus, "pool_load", LOAD)
    write(corpus, "csi_ids", IDS)
    write(corpus, "qos_params", QOS)


if __name__ == "__main__":
    main()
