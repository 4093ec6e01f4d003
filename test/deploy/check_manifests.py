#!/usr/bin/env python3
"""Checks rendered nbd-csi manifests against the binaries and against each other.

What a YAML linter cannot see, and what breaks a cluster in ways that only show at run time:
  - every argument given to our binaries is a flag the built binary accepts, every flag it
    marks REQUIRED is given, and every $(VAR) in an argument is defined in the container's env;
  - the CSI socket is the same file for the driver and each sidecar in a pod (paths resolved
    through volumeMounts to the volume, so a typo in a mount path is caught too); the node
    plugin's socket is where node-driver-registrar tells the kubelet to dial; the node plugin
    dials the datapath's API socket on the same host path;
  - the driver name is nbd.csi.io everywhere it appears;
  - StorageClass and VolumeAttributesClass parameter keys are known QoS or schedule keys;
  - the datapath runs in its own DaemonSet, never inside the node plugin pod;
  - ports, probes, the controller Service and the datapath's --controller agree;
  - the controller pod runs as a non-root user, our containers and the node plugin's registrar
    have readiness probes, every container has requests and a memory limit;
  - the provisioner's capacity mode and the CSIDriver's storageCapacity go together;
  - generated TLS secrets chain to their CA and carry the names the peers dial;
  - examples refer only to classes the chart creates and objects the examples create;
  - cluster mode (replicated volumes): every flag given to etcd is one `etcd --help` lists, the
    members' names, URLs, Service, probes and data volume agree, and the datapath dials every
    member under the scheme they serve, listens for replicas on the node's IP with the node's
    own certificate, and announces that same endpoint.

Usage: check_manifests.py --bin-dir DIR --src SRC [--examples DIR] [--expect-secrets]
                          [--self-test] RENDERED.yaml...
Exit 0: all good; 1: problems (listed); 77: PyYAML is missing (skipped) unless CI=true.
"""
import argparse
import base64
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:  # Debian: python3-yaml
    print("check_manifests: PyYAML (python3-yaml) is not installed", file=sys.stderr)
    sys.exit(1 if os.environ.get("CI") == "true" else 77)

DRIVER = "nbd.csi.io"
# csi/params.h QosParameterKeys(); the header's comment is compared below so the two move together.
QOS_KEYS = ["maxIops", "maxReadIops", "maxWriteIops", "maxBps", "maxReadBps", "maxWriteBps",
            "iopsPerGiB", "bpsPerGiB", "burstMs"]
RESERVED_PREFIX = "csi.storage.k8s.io/"
# csi/params.h: schedules (issue 18), in a StorageClass and in a VolumeAttributesClass.
SCHEDULE_KEYS = ["snapshotSchedule", "snapshotRetain", "backupSchedule", "backupRetain",
                 "backupTarget"]
OUR_BINARIES = ("nbd-csi-controller", "nbd-csi-node", "nbd-datapathd")
PROVISIONER_ARGS = ["--feature-gates", "--strict-topology", "--immediate-topology=false",
                    "--extra-create-metadata", "--leader-election", "--default-fstype=ext4"]
# Only with CSIDriver storageCapacity (CSIStorageCapacity v1, Kubernetes 1.24 and later).
CAPACITY_ARGS = ["--enable-capacity", "--capacity-ownerref-level=2"]
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
# The sidecars' flags (from each project's README for the pinned major versions), so that a
# misspelt flag, which the sidecar would refuse at start, fails here instead. Matched by image.
_COMMON = {"--csi-address", "--kubeconfig", "--timeout", "--http-endpoint", "--metrics-path",
           "--metrics-address", "--v", "--kube-api-qps", "--kube-api-burst"}
_ELECTION = {"--leader-election", "--leader-election-namespace",
             "--leader-election-lease-duration", "--leader-election-renew-deadline",
             "--leader-election-retry-period"}
SIDECAR_FLAGS = {
    "csi-provisioner": _COMMON | _ELECTION | {
        "--volume-name-prefix", "--volume-name-uuid-length", "--retry-interval-start",
        "--retry-interval-max", "--worker-threads", "--cloning-protection-threads",
        "--strict-topology", "--immediate-topology", "--extra-create-metadata",
        "--default-fstype", "--feature-gates", "--enable-capacity", "--capacity-ownerref-level",
        "--capacity-poll-interval", "--capacity-for-immediate-binding", "--capacity-threads",
        "--node-deployment", "--controller-publish-readonly", "--prevent-volume-mode-conversion"},
    "csi-snapshotter": _COMMON | _ELECTION | {
        "--snapshot-name-prefix", "--snapshot-name-uuid-length", "--extra-create-metadata",
        "--worker-threads", "--retry-interval-start", "--retry-interval-max", "--feature-gates"},
    "csi-resizer": _COMMON | _ELECTION | {
        "--workers", "--retry-interval-start", "--retry-interval-max",
        "--handle-volume-inuse-error", "--feature-gates"},
    "csi-node-driver-registrar": {"--csi-address", "--kubelet-registration-path",
                                  "--plugin-registration-path", "--http-endpoint", "--timeout",
                                  "--health-port", "--v"},
    "livenessprobe": {"--csi-address", "--health-port", "--http-endpoint", "--probe-timeout",
                      "--metrics-address", "--metrics-path", "--v"},
    # controller.healthMonitor (v0.15: cmd/csi-external-health-monitor-controller/main.go).
    "csi-external-health-monitor-controller": {
        "--csi-address", "--kubeconfig", "--timeout", "--http-endpoint", "--metrics-address",
        "--metrics-path", "--v", "--leader-election", "--leader-election-namespace",
        "--monitor-interval", "--resync", "--list-volumes-interval", "--volume-list-add-interval",
        "--node-list-add-interval", "--worker-threads", "--enable-node-watcher", "--automaxprocs"},
}


# Field names of the pod-template objects the chart writes (Kubernetes API, core/v1 and apps/v1).
# The API server rejects or, worse, silently drops an unknown field ("mountPropogation" would
# leave the kubelet mount private); helm lint does not look. Values that users pass through
# whole (resources, affinity, tolerations, nodeSelector) are not descended into.
SCHEMA = {
    "workload": {"apiVersion", "kind", "metadata", "spec"},
    "workloadSpec": {"replicas", "selector", "template", "updateStrategy", "strategy",
                     "minReadySeconds", "revisionHistoryLimit", "progressDeadlineSeconds",
                     "serviceName", "podManagementPolicy", "volumeClaimTemplates",
                     "persistentVolumeClaimRetentionPolicy"},
    "template": {"metadata", "spec"},
    "podSpec": {"serviceAccountName", "automountServiceAccountToken", "priorityClassName",
                "imagePullSecrets", "nodeSelector", "tolerations", "affinity", "containers",
                "initContainers", "volumes", "hostNetwork", "hostPID", "hostIPC", "dnsPolicy",
                "terminationGracePeriodSeconds", "securityContext", "restartPolicy", "hostAliases",
                "topologySpreadConstraints", "enableServiceLinks"},
    "container": {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom",
                  "ports", "livenessProbe", "readinessProbe", "startupProbe", "volumeMounts",
                  "volumeDevices", "securityContext", "resources", "workingDir", "lifecycle",
                  "terminationMessagePolicy"},
    "volumeMount": {"name", "mountPath", "readOnly", "mountPropagation", "subPath",
                    "recursiveReadOnly"},
    "volume": {"name", "hostPath", "emptyDir", "secret", "configMap", "projected"},
    "hostPath": {"path", "type"},
    "secretVolume": {"secretName", "defaultMode", "items", "optional"},
    "port": {"name", "containerPort", "hostPort", "protocol", "hostIP"},
    "probe": {"httpGet", "exec", "tcpSocket", "grpc", "initialDelaySeconds", "timeoutSeconds",
              "periodSeconds", "failureThreshold", "successThreshold"},
    "httpGet": {"path", "port", "host", "scheme", "httpHeaders"},
    "env": {"name", "value", "valueFrom"},
    "valueFrom": {"fieldRef", "secretKeyRef", "configMapKeyRef", "resourceFieldRef"},
    "fieldRef": {"fieldPath", "apiVersion"},
    "securityContext": {"privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem",
                        "capabilities", "runAsUser", "runAsGroup", "runAsNonRoot",
                        "seccompProfile", "seLinuxOptions"},
}
HOSTPATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket",
                  "CharDevice", "BlockDevice"}


def check_fields(ck, where, obj, kind):
    if not isinstance(obj, dict):
        ck.err(where, f"{kind} is not a mapping")
        return
    for k in obj:
        if k not in SCHEMA[kind]:
            ck.err(where, f"unknown field {k!r} in {kind}")


def check_workload_fields(ck, where, d):
    check_fields(ck, where, d, "workload")
    check_fields(ck, where, d["spec"], "workloadSpec")
    check_fields(ck, where, d["spec"]["template"], "template")
    pod = d["spec"]["template"]["spec"]
    check_fields(ck, where, pod, "podSpec")
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        cw = f"{where} container {c.get('name')}"
        check_fields(ck, cw, c, "container")
        for m in c.get("volumeMounts", []):
            check_fields(ck, cw, m, "volumeMount")
            if m.get("mountPropagation") not in (None, "None", "HostToContainer", "Bidirectional"):
                ck.err(cw, f"mountPropagation {m['mountPropagation']!r}")
            claims = [t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])]
            if not any(v["name"] == m["name"] for v in pod.get("volumes", [])) and \
                    m["name"] not in claims:
                ck.err(cw, f"mounts volume {m['name']!r}, which the pod does not define")
        for p in c.get("ports", []):
            check_fields(ck, cw, p, "port")
        for pr in ("livenessProbe", "readinessProbe", "startupProbe"):
            if pr in c:
                check_fields(ck, cw, c[pr], "probe")
                if "httpGet" in c[pr]:
                    check_fields(ck, cw, c[pr]["httpGet"], "httpGet")
        for e in c.get("env", []):
            check_fields(ck, cw, e, "env")
            if "valueFrom" in e:
                check_fields(ck, cw, e["valueFrom"], "valueFrom")
                if "fieldRef" in e["valueFrom"]:
                    check_fields(ck, cw, e["valueFrom"]["fieldRef"], "fieldRef")
        if "securityContext" in c:
            check_fields(ck, cw, c["securityContext"], "securityContext")
    names = [v.get("name") for v in pod.get("volumes", [])]
    if len(names) != len(set(names)):
        ck.err(where, f"duplicate volume names {names}")
    for v in pod.get("volumes", []):
        check_fields(ck, where, v, "volume")
        if "hostPath" in v:
            check_fields(ck, where, v["hostPath"], "hostPath")
            if v["hostPath"].get("type", "") not in HOSTPATH_TYPES:
                ck.err(where, f"hostPath type {v['hostPath'].get('type')!r}")
            if not str(v["hostPath"].get("path", "")).startswith("/"):
                ck.err(where, f"hostPath {v['hostPath'].get('path')!r} is not absolute")
        if "secret" in v:
            check_fields(ck, where, v["secret"], "secretVolume")


_HELP_CACHE = {}


class Checker:
    def __init__(self, bin_dir, src):
        self.bin_dir = bin_dir
        self.src = src
        self.errors = []
        self._help = _HELP_CACHE  # `--help` of each binary, read once per process

    def err(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    # ---- binaries -------------------------------------------------------------------------
    def flags_of(self, binary):
        """(accepted flags, required flags) parsed from `binary --help` (CLI11's layout)."""
        if binary in self._help:
            return self._help[binary]
        path = os.path.join(self.bin_dir, binary)
        if not os.access(path, os.X_OK):
            self._help[binary] = None
            return None
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"{path} --help exited {out.returncode}: {out.stderr.strip()}")
        accepted, required = set(), set()
        # Option lines start with two spaces then the names ("-h,--help", "--pool TEXT REQUIRED");
        # wrapped description lines are indented further and start with a letter.
        for line in out.stdout.splitlines():
            m = re.match(r"^ {2}((?:-\w,)?--[\w][\w-]*(?:,-\w)?)(.*)$", line)
            if not m:
                continue
            names = [n for n in m.group(1).split(",") if n.startswith("--")]
            accepted.update(names)
            # CLI11 puts REQUIRED between the type and the description.
            head = re.split(r"\s{2,}", m.group(2).strip(), maxsplit=1)[0]
            if re.search(r"\bREQUIRED\b", head):
                required.update(names)
        if not accepted:
            raise RuntimeError(f"{path} --help listed no options:\n{out.stdout}")
        self._help[binary] = (accepted, required)
        return self._help[binary]

    def etcd_flags(self):
        """The flags `etcd --help` lists (Debian's etcd-server: "  --name 'default'"), or None
        when etcd is not installed."""
        if "etcd" in self._help:
            return self._help["etcd"]
        path = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
        flags = None
        if path:
            out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30)
            flags = set(re.findall(r"^\s+(--[a-z0-9][a-z0-9-]*)", out.stdout + out.stderr, re.M))
            if not flags:
                raise RuntimeError(f"{path} --help listed no flags:\n{out.stdout}{out.stderr}")
        self._help["etcd"] = flags
        return flags

    def values_accepted(self, binary, args, env):
        """Runs `binary ARGS --help`: CLI11 converts and range-checks each value while parsing,
        before it acts on --help, so exit 0 means every value is acceptable, and nothing
        starts. $(VAR) references are replaced by a value of the kind the downward API gives."""
        sample = {"spec.nodeName": "node-1.example", "status.hostIP": "192.0.2.10",
                  "metadata.namespace": "nbd-csi", "metadata.name": "pod-0"}
        subst = {}
        for e in env:
            fp = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            subst[e["name"]] = e.get("value", sample.get(fp, "x"))
        real = [re.sub(r"\$\((\w+)\)", lambda m: subst.get(m.group(1), m.group(0)), a) for a in args]
        out = subprocess.run([os.path.join(self.bin_dir, binary)] + real + ["--help"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return (out.stderr or out.stdout).strip().splitlines()[0:2]
        return None

    def check_params_header(self):
        hdr = os.path.join(self.src, "csi", "params.h")
        try:
            text = open(hdr, encoding="utf-8").read()
        except OSError:
            return
        m = re.search(r"accepted keys in table order:\s*((?:\S+\s+(?://\s*)?)+?\S+)\.", text)
        if not m:
            return  # the comment was reworded; QOS_KEYS stays the reference
        keys = re.sub(r"//", " ", m.group(1)).split()
        if keys != QOS_KEYS:
            self.err("csi/params.h", f"QoS keys {keys} differ from the checker's {QOS_KEYS}")


def pods_of(docs):
    """(where, workload doc, pod spec) for each workload."""
    for d in docs:
        if d.get("kind") in WORKLOADS:
            where = f"{d['kind']}/{d['metadata']['name']}"
            yield where, d, d["spec"]["template"]["spec"]


def arg_value(args, flag):
    """Value of --flag=V or --flag V in args; None when absent."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args) and not args[i + 1].startswith("--"):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def has_flag(args, flag):
    return any(a == flag or a.startswith(flag + "=") for a in args)


def binary_of(container):
    cmd = container.get("command") or []
    return os.path.basename(cmd[0]) if cmd else None


def strip_unix(endpoint):
    if endpoint is None:
        return None
    if endpoint.startswith("unix://"):
        return endpoint[len("unix://"):]
    return endpoint


def resolve(pod, container, path):
    """Where a path inside a container really is: ('host', abs path) through a hostPath volume,
    ('emptyDir:NAME', rel) through an emptyDir, or ('container', path) when no mount covers it."""
    if path is None:
        return None
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/") or mp == "/":
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    if best is None:
        return ("container", path)
    rel = path[len(best["mountPath"].rstrip("/")):].lstrip("/")
    vol = next((v for v in pod.get("volumes", []) if v["name"] == best["name"]), None)
    if vol is None:
        return ("missing-volume:" + best["name"], rel)
    if "hostPath" in vol:
        return ("host", os.path.normpath(os.path.join(vol["hostPath"]["path"], rel)))
    if "emptyDir" in vol:
        return ("emptyDir:" + vol["name"], rel)
    return ("volume:" + vol["name"], rel)


def container_port(container, port):
    """A probe's port (number or name) as a number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def port_of(value):
    """Port in ':9809', '0.0.0.0:9811', '9808'."""
    if value is None:
        return None
    m = re.search(r"(\d+)$", value)
    return int(m.group(1)) if m else None


def check(ck, docs, expect_secrets, quiet=False):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)

    # ---- CSIDriver ------------------------------------------------------------------------
    drivers = by_kind.get("CSIDriver", [])
    if len(drivers) != 1:
        ck.err("CSIDriver", f"expected exactly one, found {len(drivers)}")
    for d in drivers:
        if d["metadata"]["name"] != DRIVER:
            ck.err("CSIDriver", f"name {d['metadata']['name']!r}, want {DRIVER}")
        want = {"attachRequired": False, "podInfoOnMount": False,
                "fsGroupPolicy": "File", "requiresRepublish": False,
                "volumeLifecycleModes": ["Persistent"]}
        for k, v in want.items():
            if d["spec"].get(k) != v:
                ck.err("CSIDriver", f"spec.{k} = {d['spec'].get(k)!r}, want {v!r}")
        if d["spec"].get("storageCapacity") not in (True, False):
            ck.err("CSIDriver", f"spec.storageCapacity = {d['spec'].get('storageCapacity')!r}")

    # ---- classes --------------------------------------------------------------------------
    for sc in by_kind.get("StorageClass", []):
        where = f"StorageClass/{sc['metadata']['name']}"
        if sc.get("provisioner") != DRIVER:
            ck.err(where, f"provisioner {sc.get('provisioner')!r}, want {DRIVER}")
        # Volumes are node-local: the scheduler picks the node with the pod (WaitForFirstConsumer);
        # Immediate lets the controller pick it, which restores need (the snapshot's node).
        if sc.get("volumeBindingMode") not in ("WaitForFirstConsumer", "Immediate"):
            ck.err(where, f"volumeBindingMode {sc.get('volumeBindingMode')!r}: WaitForFirstConsumer or Immediate")
        if (sc.get("volumeBindingMode") == "Immediate" and
                not sc["metadata"]["name"].endswith("-restore")):
            ck.err(where, "Immediate binding places blank volumes without the pod's node: "
                          "only for restore classes (named *-restore)")
        for k, v in (sc.get("parameters") or {}).items():
            if k.startswith(RESERVED_PREFIX):
                if k == RESERVED_PREFIX + "fstype" and v not in ("ext4", "xfs"):
                    ck.err(where, f"fstype {v!r}: the node plugin formats ext4 or xfs")
                continue
            if k == "replicas":
                # Replicated volumes (issue 16) expand online like the others.
                if v not in ("1", "2", "3"):
                    ck.err(where, f"replicas {v!r}: \"1\", \"2\" or \"3\"")
            elif k not in QOS_KEYS + SCHEDULE_KEYS:
                ck.err(where, f"unknown parameter {k!r}; known: {', '.join(QOS_KEYS + SCHEDULE_KEYS)}, replicas")
            if not isinstance(v, str):
                ck.err(where, f"parameter {k} must be a string, got {v!r}")
    for vsc in by_kind.get("VolumeSnapshotClass", []):
        if vsc.get("driver") != DRIVER:
            ck.err(f"VolumeSnapshotClass/{vsc['metadata']['name']}",
                   f"driver {vsc.get('driver')!r}, want {DRIVER}")
    for vac in by_kind.get("VolumeAttributesClass", []):
        where = f"VolumeAttributesClass/{vac['metadata']['name']}"
        if vac.get("driverName") != DRIVER:
            ck.err(where, f"driverName {vac.get('driverName')!r}, want {DRIVER}")
        if not vac.get("parameters"):
            ck.err(where, "no parameters: ControllerModifyVolume would have nothing to change")
        for k in (vac.get("parameters") or {}):
            if k not in QOS_KEYS + SCHEDULE_KEYS:
                ck.err(where, f"unknown parameter {k!r}; known: {', '.join(QOS_KEYS + SCHEDULE_KEYS)}")

    # ---- field names ----------------------------------------------------------------------
    for where, wl, _ in pods_of(docs):
        check_workload_fields(ck, where, wl)

    # ---- sidecar flags --------------------------------------------------------------------
    for where, _, pod in pods_of(docs):
        for c in pod.get("containers", []):
            image = c.get("image", "")
            name = next((k for k in SIDECAR_FLAGS if f"/{k}:" in image), None)
            if name is None:
                continue
            for a in c.get("args", []):
                flag = a.split("=", 1)[0]
                if a.startswith("--") and flag not in SIDECAR_FLAGS[name]:
                    ck.err(f"{where} container {c['name']}", f"{name} has no flag {flag}")

    # ---- our containers: flags ------------------------------------------------------------
    found = {}
    for where, wl, pod in pods_of(docs):
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            b = binary_of(c)
            if b is None or b not in OUR_BINARIES:
                continue
            found.setdefault(b, []).append((where, wl, pod, c))
            cw = f"{where} container {c['name']} ({b})"
            if c.get("image", "").startswith("registry.k8s.io/"):
                ck.err(cw, "runs our binary from a sidecar image")
            flags = ck.flags_of(b)
            args = c.get("args", [])
            if flags is None:
                ck.err(cw, f"{os.path.join(ck.bin_dir, b)} is not built: cannot check its flags")
            else:
                accepted, required = flags
                for a in args:
                    if not a.startswith("--"):
                        continue
                    name = a.split("=", 1)[0]
                    if name not in accepted:
                        ck.err(cw, f"argument {a!r}: {b} has no flag {name} "
                                   f"(it has {' '.join(sorted(accepted))})")
                for r in sorted(required):
                    if not has_flag(args, r):
                        ck.err(cw, f"required flag {r} is not given")
                bad = ck.values_accepted(b, args, c.get("env", []))
                if bad:
                    ck.err(cw, f"{b} refuses these arguments: {' / '.join(bad)}")
            env = {e["name"] for e in c.get("env", [])}
            for a in args:
                for var in re.findall(r"\$\((\w+)\)", a):
                    if var not in env:
                        ck.err(cw, f"argument {a!r} uses $({var}), which env does not define")
    for b in OUR_BINARIES:
        if b not in found:
            ck.err("workloads", f"no container runs {b}")
        elif len(found[b]) != 1:
            ck.err("workloads", f"{b} runs in {len(found[b])} containers: "
                                f"{', '.join(w for w, *_ in found[b])}")
    if any(b not in found or len(found[b]) != 1 for b in OUR_BINARIES):
        return

    ctl_where, ctl_wl, ctl_pod, ctl = found["nbd-csi-controller"][0]
    node_where, node_wl, node_pod, node = found["nbd-csi-node"][0]
    dp_where, dp_wl, dp_pod, dp = found["nbd-datapathd"][0]

    # ---- the datapath is its own DaemonSet ------------------------------------------------
    if dp_wl is node_wl:
        ck.err(node_where, "nbd-datapathd runs inside the node plugin pod: restarting the plugin "
                           "would kill the I/O of every attached volume (DESIGN.md)")
    if dp_wl is ctl_wl:
        ck.err(ctl_where, "nbd-datapathd runs inside the controller pod")
    if dp_wl["kind"] != "DaemonSet" or node_wl["kind"] != "DaemonSet":
        ck.err("workloads", "the node plugin and the datapath must each be a DaemonSet")
    if [binary_of(c) for c in dp_pod["containers"]] != ["nbd-datapathd"]:
        ck.err(dp_where, "the datapath pod must hold nbd-datapathd alone, so that nothing else "
                         "restarts it")
    if ctl_wl["kind"] != "Deployment":
        ck.err(ctl_where, "the controller must be a Deployment")
    if dp_wl["spec"].get("updateStrategy", {}).get("type") not in ("OnDelete", "RollingUpdate"):
        ck.err(dp_where, "updateStrategy.type must be set (OnDelete by default)")
    if not dp_pod.get("hostNetwork"):
        ck.err(dp_where, "hostNetwork must be true: --advertise is the node's IP")
    elif dp_pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
        ck.err(dp_where, "dnsPolicy must be ClusterFirstWithHostNet to resolve the controller "
                         "Service from the host network")
    for where, c in ((dp_where, dp), (node_where, node)):
        if not (c.get("securityContext") or {}).get("privileged"):
            ck.err(where, f"container {c['name']} must be privileged")

    # ---- sockets --------------------------------------------------------------------------
    def sidecars(pod, image_part):
        return [c for c in pod["containers"] if image_part in c.get("image", "")]

    ctl_sock = resolve(ctl_pod, ctl, strip_unix(arg_value(ctl["args"], "--csi-endpoint")))
    if ctl_sock is None or ctl_sock[0] == "container":
        ck.err(ctl_where, f"--csi-endpoint {ctl_sock} is not on a volume the sidecars can share")
    for image in ("csi-provisioner", "csi-snapshotter", "csi-resizer", "livenessprobe",
                  "csi-external-health-monitor-controller"):
        cs = sidecars(ctl_pod, image)
        # The health monitor only with controller.healthMonitor.enabled.
        if len(cs) != 1 and not (image == "csi-external-health-monitor-controller" and not cs):
            ck.err(ctl_where, f"expected one {image} sidecar, found {len(cs)}")
        for c in cs:
            got = resolve(ctl_pod, c, strip_unix(arg_value(c.get("args", []), "--csi-address")))
            if got != ctl_sock:
                ck.err(ctl_where, f"{c['name']} dials {got}, the driver listens on {ctl_sock}")

    node_sock = resolve(node_pod, node, strip_unix(arg_value(node["args"], "--csi-endpoint")))
    if node_sock is None or node_sock[0] != "host":
        ck.err(node_where, f"--csi-endpoint {node_sock} is not on a hostPath the kubelet can reach")
    regs = sidecars(node_pod, "csi-node-driver-registrar")
    if len(regs) != 1:
        ck.err(node_where, f"expected one node-driver-registrar, found {len(regs)}")
    for r in regs:
        rargs = r.get("args", [])
        got = resolve(node_pod, r, strip_unix(arg_value(rargs, "--csi-address")))
        if got != node_sock:
            ck.err(node_where, f"registrar dials {got}, the node plugin listens on {node_sock}")
        kreg = arg_value(rargs, "--kubelet-registration-path")
        if node_sock and ("host", kreg) != node_sock:
            ck.err(node_where, f"--kubelet-registration-path {kreg} is not the node plugin's "
                               f"socket on the host {node_sock}")
        if kreg and f"/plugins/{DRIVER}/" not in kreg:
            ck.err(node_where, f"--kubelet-registration-path {kreg} is not under plugins/{DRIVER}/")
        regdir = resolve(node_pod, r, "/registration")
        if not (regdir and regdir[0] == "host" and regdir[1].endswith("/plugins_registry")):
            ck.err(node_where, f"registrar's /registration is {regdir}, not the kubelet's "
                               "plugins_registry")
    for c in sidecars(node_pod, "livenessprobe"):
        got = resolve(node_pod, c, strip_unix(arg_value(c.get("args", []), "--csi-address")))
        if got != node_sock:
            ck.err(node_where, f"{c['name']} dials {got}, the node plugin listens on {node_sock}")

    dp_api = resolve(dp_pod, dp, strip_unix(arg_value(dp["args"], "--api")))
    node_dp = resolve(node_pod, node, strip_unix(arg_value(node["args"], "--datapath")))
    if dp_api is None or dp_api[0] != "host":
        ck.err(dp_where, f"--api {dp_api} is not on a hostPath the node plugin can share")
    if node_dp != dp_api:
        ck.err(node_where, f"--datapath is {node_dp} on the host, the datapath's --api is {dp_api}")

    kubelet = [m for m in node.get("volumeMounts", []) if m["mountPath"].endswith("/kubelet")]
    if not kubelet or kubelet[0].get("mountPropagation") != "Bidirectional":
        ck.err(node_where, "the kubelet directory must be mounted with Bidirectional propagation")
    for where, pod, c in ((node_where, node_pod, node), (dp_where, dp_pod, dp)):
        if resolve(pod, c, "/dev/nbd0") != ("host", "/dev/nbd0"):
            ck.err(where, f"{c['name']} does not see the host's /dev")
    for path in ("/sys/block", "/lib/modules"):
        if resolve(dp_pod, dp, path) != ("host", path):
            ck.err(dp_where, f"the datapath does not see the host's {path}")
    pool = resolve(dp_pod, dp, arg_value(dp["args"], "--pool"))
    if not pool or pool[0] != "host":
        ck.err(dp_where, f"--pool {pool} is not a host directory: volumes would die with the pod")

    # ---- node identity, probes, ports -----------------------------------------------------
    for where, c, fieldpath in ((node_where, node, "spec.nodeName"),
                                (dp_where, dp, "spec.nodeName")):
        nid = arg_value(c["args"], "--node-id") or ""
        m = re.fullmatch(r"\$\((\w+)\)", nid)
        src = None
        if m:
            for e in c.get("env", []):
                if e["name"] == m.group(1):
                    src = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        if src != fieldpath:
            ck.err(where, f"--node-id={nid} must come from {fieldpath} (the topology key's value)")
    adv = arg_value(dp["args"], "--advertise") or ""
    m = re.fullmatch(r"\$\((\w+)\):(\d+)", adv)
    if not m:
        ck.err(dp_where, f"--advertise={adv!r} must be $(HOST_IP):PORT")
    else:
        env = {e["name"]: e for e in dp.get("env", [])}
        fp = ((env.get(m.group(1), {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        if fp != "status.hostIP":
            ck.err(dp_where, f"$({m.group(1)}) in --advertise must come from status.hostIP")
        listen = arg_value(dp["args"], "--api-tcp-listen")
        if listen and port_of(listen) != int(m.group(2)):
            ck.err(dp_where, "--api-tcp-listen and --advertise use different ports")

    for where, pod in ((ctl_where, ctl_pod), (node_where, node_pod)):
        main = ctl if pod is ctl_pod else node
        lps = sidecars(pod, "livenessprobe")
        probe = (main.get("livenessProbe") or {}).get("httpGet")
        if not lps or not probe:
            ck.err(where, f"{main['name']} needs a livenessProbe served by the livenessprobe sidecar")
            continue
        want = port_of(arg_value(lps[0].get("args", []), "--health-port"))
        if container_port(main, probe.get("port")) != want:
            ck.err(where, f"{main['name']} probes port {probe.get('port')}, livenessprobe serves "
                          f"--health-port {want}")
    # --metrics-listen: /readyz is the readiness probe, on the port the daemon listens on, and
    # the scrape annotations (when present) point Prometheus at that same port.
    for where, wl, c in ((ctl_where, ctl_wl, ctl), (node_where, node_wl, node),
                         (dp_where, dp_wl, dp)):
        listen = arg_value(c["args"], "--metrics-listen")
        annotations = wl["spec"]["template"]["metadata"].get("annotations") or {}
        scrape_port = annotations.get("prometheus.io/port")
        if not listen:
            if annotations.get("prometheus.io/scrape") == "true":
                ck.err(where, f"{c['name']} is annotated for scraping but has no --metrics-listen")
            continue
        mport = port_of(listen)
        ready = (c.get("readinessProbe") or {}).get("httpGet") or {}
        if ready.get("path") != "/readyz" or container_port(c, ready.get("port")) != mport:
            ck.err(where, f"{c['name']} serves /readyz on {mport} (--metrics-listen) but its "
                          f"readinessProbe asks {ready.get('path')} on {ready.get('port')}")
        if scrape_port is not None and str(scrape_port) != str(mport):
            ck.err(where, f"prometheus.io/port {scrape_port} is not {c['name']}'s metrics port "
                          f"{mport}")
    for r in regs:
        probe = (r.get("livenessProbe") or {}).get("httpGet")
        if probe and container_port(r, probe.get("port")) != port_of(
                arg_value(r.get("args", []), "--http-endpoint")):
            ck.err(node_where, "registrar's livenessProbe port is not its --http-endpoint")

    services = by_kind.get("Service", [])
    ctl_labels = ctl_wl["spec"]["template"]["metadata"]["labels"]
    reg_port = port_of(arg_value(ctl["args"], "--registry-listen"))
    controller = arg_value(dp["args"], "--controller") or ""
    cm = re.fullmatch(r"([a-z0-9.-]+):(\d+)", controller)
    if not cm:
        ck.err(dp_where, f"--controller={controller!r} is not HOST:PORT")
    else:
        host, port = cm.group(1), int(cm.group(2))
        svc = next((s for s in services
                    if host in (s["metadata"]["name"],
                                f"{s['metadata']['name']}.{s['metadata'].get('namespace')}",
                                f"{s['metadata']['name']}.{s['metadata'].get('namespace')}.svc")),
                   None)
        if svc is None:
            ck.err(dp_where, f"--controller host {host} is no Service in the manifests")
        else:
            sel = svc["spec"].get("selector") or {}
            if not sel or any(ctl_labels.get(k) != v for k, v in sel.items()):
                ck.err(f"Service/{svc['metadata']['name']}", "does not select the controller pods")
            sp = next((p for p in svc["spec"]["ports"] if p["port"] == port), None)
            if sp is None:
                ck.err(f"Service/{svc['metadata']['name']}", f"has no port {port} (--controller)")
            elif container_port(ctl, sp.get("targetPort", sp["port"])) != reg_port:
                ck.err(f"Service/{svc['metadata']['name']}",
                       f"targets {sp.get('targetPort')}, the registry listens on {reg_port}")
    hb_dp = arg_value(dp["args"], "--heartbeat-interval")
    hb_ctl = arg_value(ctl["args"], "--heartbeat-interval")
    if hb_dp != hb_ctl:
        ck.err(dp_where, f"--heartbeat-interval {hb_dp} differs from the controller's {hb_ctl}")

    # ---- sidecar arguments ----------------------------------------------------------------
    capacity = any(d["spec"].get("storageCapacity") for d in drivers)
    for c in sidecars(ctl_pod, "csi-provisioner"):
        for a in PROVISIONER_ARGS + (CAPACITY_ARGS if capacity else []):
            if not (has_flag(c["args"], a) if "=" not in a else a in c["args"]):
                ck.err(ctl_where, f"csi-provisioner lacks {a}")
        if not capacity and has_flag(c["args"], "--enable-capacity"):
            ck.err(ctl_where, "csi-provisioner publishes capacity (--enable-capacity), but the "
                              "CSIDriver has storageCapacity false: the scheduler would ignore it")
        gates = arg_value(c["args"], "--feature-gates") or ""
        if "Topology=true" not in gates.split(","):
            ck.err(ctl_where, "csi-provisioner needs --feature-gates=Topology=true")
        envs = {e["name"] for e in c.get("env", [])}
        if not {"NAMESPACE", "POD_NAME"} <= envs:
            ck.err(ctl_where, "csi-provisioner with --enable-capacity needs NAMESPACE and POD_NAME")
    for c in sidecars(ctl_pod, "csi-resizer"):
        if "--handle-volume-inuse-error=false" not in c["args"]:
            ck.err(ctl_where, "csi-resizer lacks --handle-volume-inuse-error=false")
    for image in ("csi-provisioner", "csi-snapshotter", "csi-resizer",
                  "csi-external-health-monitor-controller"):
        for c in sidecars(ctl_pod, image):
            if "--leader-election" not in c["args"]:
                ck.err(ctl_where, f"{image} lacks --leader-election (two replicas)")
    if by_kind.get("VolumeAttributesClass"):
        for image in ("csi-provisioner", "csi-resizer"):
            for c in sidecars(ctl_pod, image):
                if "VolumeAttributesClass=true" not in (arg_value(c["args"], "--feature-gates") or ""):
                    ck.err(ctl_where, f"{image} needs the VolumeAttributesClass feature gate when "
                                      "VolumeAttributesClasses are deployed")

    # ---- users, probes, resources ---------------------------------------------------------
    psc = ctl_pod.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True or not psc.get("runAsUser"):
        ck.err(ctl_where, "the controller pod must run as a non-root user (securityContext "
                          f"runAsNonRoot and a non-zero runAsUser), got {psc}")
    for c in ctl_pod["containers"]:
        csc = c.get("securityContext") or {}
        if csc.get("runAsUser") == 0 or csc.get("privileged") or csc.get("runAsNonRoot") is False:
            ck.err(ctl_where, f"container {c['name']} overrides the pod's non-root user: {csc}")
    for where, pod, c in ((ctl_where, ctl_pod, ctl), (node_where, node_pod, node),
                          (dp_where, dp_pod, dp)) + tuple((node_where, node_pod, r) for r in regs):
        if not c.get("readinessProbe"):
            ck.err(where, f"container {c['name']} has no readinessProbe")
    for where, _, pod in pods_of(docs):
        for c in pod["containers"]:
            res = c.get("resources") or {}
            if not (res.get("requests") or {}).get("cpu") or not (res.get("requests") or {}).get("memory"):
                ck.err(where, f"container {c['name']} has no cpu and memory requests")
            if not (res.get("limits") or {}).get("memory"):
                ck.err(where, f"container {c['name']} has no memory limit")

    # ---- RBAC -----------------------------------------------------------------------------
    sa = ctl_pod.get("serviceAccountName")
    ns = ctl_wl["metadata"].get("namespace")
    granted = {}  # (apiGroup, resource) -> verbs
    roles = {(r["kind"], r["metadata"]["name"]): r
             for r in by_kind.get("ClusterRole", []) + by_kind.get("Role", [])}
    for b in by_kind.get("ClusterRoleBinding", []) + by_kind.get("RoleBinding", []):
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and
                   s.get("namespace") == ns for s in b.get("subjects", [])):
            continue
        role = roles.get((b["roleRef"]["kind"], b["roleRef"]["name"]))
        if role is None:
            ck.err(f"{b['kind']}/{b['metadata']['name']}", f"refers to missing {b['roleRef']}")
            continue
        for rule in role.get("rules", []):
            for g in rule.get("apiGroups", []):
                for res in rule.get("resources", []):
                    granted.setdefault((g, res), set()).update(rule.get("verbs", []))
    needs = [
        ("", "persistentvolumes", {"create", "delete", "patch", "watch"}),
        ("", "persistentvolumeclaims", {"get", "watch", "update"}),
        ("storage.k8s.io", "csistoragecapacities", {"create", "update", "delete", "watch"}),
        ("storage.k8s.io", "csinodes", {"get", "list", "watch"}),
        ("", "nodes", {"get", "list", "watch"}),
        ("coordination.k8s.io", "leases", {"get", "create", "update"}),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", {"create", "update", "delete"}),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", {"update", "patch"}),
        ("snapshot.storage.k8s.io", "volumesnapshotclasses", {"get", "list", "watch"}),
        ("", "persistentvolumeclaims/status", {"patch"}),
        ("storage.k8s.io", "volumeattributesclasses", {"get", "list", "watch"}),
        ("apps", "replicasets", {"get"}),
        ("", "pods", {"get"}),
    ]
    # The health monitor lists PVs, PVCs, pods and nodes and records events on PVCs.
    if any("csi-external-health-monitor-controller" in c.get("image", "")
           for c in ctl_pod["containers"]):
        needs += [("", r, {"get", "list", "watch"})
                  for r in ("persistentvolumes", "persistentvolumeclaims", "pods", "nodes")]
        needs.append(("", "events", {"create", "patch"}))
    for g, res, verbs in needs:
        missing = verbs - granted.get((g, res), set())
        if missing:
            ck.err(f"RBAC for {sa}", f"{g or 'core'}/{res} lacks {', '.join(sorted(missing))}")

    # ---- TLS ------------------------------------------------------------------------------
    secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}

    def secret_of(pod, c):
        for m in c.get("volumeMounts", []):
            vol = next((v for v in pod.get("volumes", []) if v["name"] == m["name"]), {})
            if "secret" in vol:
                return vol["secret"]["secretName"], m["mountPath"]
            # Per-node certificates (tls.datapathHostPath): the node's own directory.
            if m["name"] == "tls" and "hostPath" in vol:
                return "hostPath:" + vol["hostPath"]["path"], m["mountPath"]
        return None, None

    for where, pod, c in ((ctl_where, ctl_pod, ctl), (dp_where, dp_pod, dp)):
        name, mount = secret_of(pod, c)
        if name is None:
            ck.err(where, "no TLS secret mounted")
            continue
        for flag, key in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--tls-ca", "ca.crt")):
            if arg_value(c["args"], flag) != f"{mount}/{key}":
                ck.err(where, f"{flag} is {arg_value(c['args'], flag)}, want {mount}/{key}")
        if has_flag(c["args"], "--insecure"):
            ck.err(where, "--insecure in a deployment")
        if expect_secrets and name not in secrets and not name.startswith("hostPath:"):
            ck.err(where, f"secret {name} is not rendered")
    check_cluster(ck, docs, by_kind, dp_where, dp_pod, dp)
    check_controller_cluster(ck, ctl_where, ctl_pod, ctl, dp)
    if expect_secrets:
        ctl_secret = secrets.get(secret_of(ctl_pod, ctl)[0])
        dp_secret = secrets.get(secret_of(dp_pod, dp)[0])
        host = cm.group(1) if cm else None
        if ctl_secret and dp_secret and host:
            check_certs(ck, ctl_secret, dp_secret, host)


def env_field(c, var):
    """The downward-API fieldPath behind $(var) in container c, or None."""
    for e in c.get("env", []):
        if e["name"] == var:
            return ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
    return None


def mounted_file(pod, c, path):
    """Whether a TLS file path is on a secret or hostPath volume the container mounts."""
    where = resolve(pod, c, path)
    return where is not None and (where[0] == "host" or where[0].startswith("volume:"))


def check_controller_cluster(ck, ctl_where, ctl_pod, ctl, dp):
    """The controller keeps the catalogue of replicated volumes in the same etcd, under the same
    prefix, as the datapaths keep their targets: a mismatch would make every replicated volume
    invisible to the nodes that must serve it."""
    cargs, dargs = ctl["args"], dp["args"]
    for flag in ("--cluster-etcd", "--cluster-prefix"):
        if arg_value(cargs, flag) != arg_value(dargs, flag):
            ck.err(ctl_where, f"{flag}={arg_value(cargs, flag)}, but the datapath has "
                              f"{arg_value(dargs, flag)}")
    if arg_value(cargs, "--cluster-etcd") is None:
        for a in cargs:
            if a.startswith("--cluster-"):
                ck.err(ctl_where, f"{a} without --cluster-etcd")
        return
    if has_flag(cargs, "--cluster-etcd-insecure") != has_flag(dargs, "--cluster-etcd-insecure"):
        ck.err(ctl_where, "--cluster-etcd-insecure differs between controller and datapath")
    if not has_flag(cargs, "--cluster-etcd-insecure"):
        for flag in ("--cluster-etcd-tls-cert", "--cluster-etcd-tls-key", "--cluster-etcd-tls-ca"):
            v = arg_value(cargs, flag)
            if not v or not mounted_file(ctl_pod, ctl, v):
                ck.err(ctl_where, f"{flag}={v} is not a file on a mounted secret")


def check_cluster(ck, docs, by_kind, dp_where, dp_pod, dp):
    """Replicated volumes (chart values cluster.*): the datapath's --cluster-* flags, the TCP NBD
    listener the replicas are reached on, and the etcd StatefulSet they point at."""
    args = dp["args"]
    etcds = [(where, wl, pod, c) for where, wl, pod in pods_of(docs)
             for c in pod["containers"] if binary_of(c) == "etcd"]
    endpoints = arg_value(args, "--cluster-etcd")
    if endpoints is None:
        for where, *_ in etcds:
            ck.err(where, "etcd is deployed but the datapath has no --cluster-etcd")
        for a in args:
            if a.startswith("--cluster-") or a.startswith("--nbd-listen=tcp://"):
                ck.err(dp_where, f"{a} without --cluster-etcd")
        return

    # The replica listener: on the node's own address (what other nodes dial), with TLS from the
    # node's own certificate, which a target checks against the node it dials.
    tcp = [a.split("=", 1)[1] for a in args if a.startswith("--nbd-listen=tcp://")]
    m = re.fullmatch(r"tcp://\$\((\w+)\):(\d+)", tcp[0]) if len(tcp) == 1 else None
    if not m:
        ck.err(dp_where, f"cluster mode needs one --nbd-listen=tcp://$(HOST_IP):PORT, got {tcp}")
    else:
        if env_field(dp, m.group(1)) != "status.hostIP":
            ck.err(dp_where, f"$({m.group(1)}) in --nbd-listen must come from status.hostIP")
        port = int(m.group(2))
        if not any(p["containerPort"] == port and p.get("hostPort") == port
                   for p in dp.get("ports", [])):
            ck.err(dp_where, f"the replica port {port} is not a container port with hostPort")
        if arg_value(args, "--cluster-nbd-endpoint") != tcp[0]:
            ck.err(dp_where, f"--cluster-nbd-endpoint {arg_value(args, '--cluster-nbd-endpoint')} "
                             f"is not the TCP NBD listener {tcp[0]}")
    tls_vol = next((v for v in dp_pod.get("volumes", []) if v["name"] == "tls"), {})
    if "hostPath" not in tls_vol:
        ck.err(dp_where, "cluster mode needs each node's own certificate (tls volume from a "
                         "hostPath): a target checks that its replica's certificate names the node")
    for flag in ("--nbd-tls-cert", "--nbd-tls-key", "--nbd-tls-ca"):
        want = arg_value(args, flag.replace("--nbd-", "--"))
        if arg_value(args, flag) != want:
            ck.err(dp_where, f"{flag} is {arg_value(args, flag)}, want the node certificate {want}")
    insecure = has_flag(args, "--cluster-etcd-insecure")
    if not insecure:
        for flag in ("--cluster-etcd-tls-cert", "--cluster-etcd-tls-key", "--cluster-etcd-tls-ca"):
            v = arg_value(args, flag)
            if not v or not mounted_file(dp_pod, dp, v):
                ck.err(dp_where, f"{flag}={v} is not a file on a mounted secret or host directory")

    if not etcds:
        return  # an external etcd: nothing more to compare with
    if len(etcds) != 1:
        ck.err("etcd", f"{len(etcds)} etcd workloads: {', '.join(w for w, *_ in etcds)}")
        return
    where, wl, pod, c = etcds[0]
    eargs = c.get("args", [])
    flags = ck.etcd_flags()
    if flags is None:
        ck.err(where, "etcd is not installed here (apt-get install etcd-server): cannot check its flags")
    else:
        for a in eargs:
            if a.startswith("--") and a.split("=", 1)[0] not in flags:
                ck.err(where, f"etcd has no flag {a.split('=', 1)[0]} ({a!r})")
    for a in eargs:
        for var in re.findall(r"\$\((\w+)\)", a):
            if env_field(c, var) is None and not any(e["name"] == var for e in c.get("env", [])):
                ck.err(where, f"argument {a!r} uses $({var}), which env does not define")
    if wl["kind"] != "StatefulSet":
        ck.err(where, "etcd must be a StatefulSet (stable names and volumes per member)")
        return
    n = wl["spec"].get("replicas", 1)
    if n % 2 == 0:
        ck.err(where, f"{n} members: an even count tolerates no more failures than {n - 1}")
    if wl["spec"].get("podManagementPolicy") != "Parallel":
        ck.err(where, "podManagementPolicy must be Parallel: a new member waits for its peers")
    if arg_value(eargs, "--name") != "$(POD_NAME)" or env_field(c, "POD_NAME") != "metadata.name":
        ck.err(where, "--name must be $(POD_NAME) from metadata.name (the member names of "
                      "--initial-cluster are the pod names)")
    name, ns, svc_name = wl["metadata"]["name"], wl["metadata"].get("namespace"), wl["spec"].get("serviceName")
    svc = next((s for s in by_kind.get("Service", []) if s["metadata"]["name"] == svc_name), None)
    if svc is None:
        ck.err(where, f"serviceName {svc_name} is no Service in the manifests")
        return
    if svc["spec"].get("clusterIP") != "None" or not svc["spec"].get("publishNotReadyAddresses"):
        ck.err(f"Service/{svc_name}", "must be headless and publish not-ready members (peers "
                                      "find each other before a quorum)")
    labels = wl["spec"]["template"]["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in (svc["spec"].get("selector") or {"": None}).items()):
        ck.err(f"Service/{svc_name}", "does not select the etcd pods")
    secure = has_flag(eargs, "--client-cert-auth")
    scheme = "https" if secure else "http"
    client = port_of(arg_value(eargs, "--listen-client-urls"))
    peer = port_of(arg_value(eargs, "--listen-peer-urls"))
    host = lambda i: f"{name}-{i}.{svc_name}.{ns}.svc"
    want_initial = ",".join(f"{name}-{i}={scheme}://{host(i)}:{peer}" for i in range(n))
    if arg_value(eargs, "--initial-cluster") != want_initial:
        ck.err(where, f"--initial-cluster={arg_value(eargs, '--initial-cluster')}, want {want_initial}")
    for flag, port in (("--initial-advertise-peer-urls", peer), ("--advertise-client-urls", client)):
        want = f"{scheme}://$(POD_NAME).{svc_name}.{ns}.svc:{port}"
        if arg_value(eargs, flag) != want:
            ck.err(where, f"{flag}={arg_value(eargs, flag)}, want {want}")
    for flag, port in (("--listen-client-urls", client), ("--listen-peer-urls", peer)):
        if not (arg_value(eargs, flag) or "").startswith(f"{scheme}://"):
            ck.err(where, f"{flag} must be {scheme}:// (client-cert-auth {secure})")
        sp = next((p for p in svc["spec"].get("ports", []) if p["port"] == port), None)
        if sp is None or container_port(c, sp.get("targetPort", port)) != port:
            ck.err(f"Service/{svc_name}", f"does not carry etcd's port {port} ({flag})")
    if secure != has_flag(eargs, "--peer-client-cert-auth"):
        ck.err(where, "clients and peers must both be authenticated, or neither (insecure)")
    if secure:
        for flag in ("--cert-file", "--key-file", "--trusted-ca-file", "--peer-cert-file",
                     "--peer-key-file", "--peer-trusted-ca-file"):
            v = arg_value(eargs, flag)
            if not v or not mounted_file(pod, c, v):
                ck.err(where, f"{flag}={v} is not a file on a mounted secret")
        # A certificate cert-manager issues into the members' secret names every member.
        where_cert = resolve(pod, c, arg_value(eargs, "--cert-file") or "/")
        vol = next((v for v in pod.get("volumes", []) if where_cert and
                    where_cert[0] == "volume:" + v["name"]), {})
        secret = (vol.get("secret") or {}).get("secretName")
        for cert in by_kind.get("Certificate", []):
            if cert["spec"].get("secretName") == secret:
                missing = [host(i) for i in range(n) if host(i) not in cert["spec"].get("dnsNames", [])]
                if missing:
                    ck.err(f"Certificate/{cert['metadata']['name']}",
                           f"does not name the members {', '.join(missing)}")
    claims = [t["metadata"]["name"] for t in wl["spec"].get("volumeClaimTemplates", [])]
    mount = next((m for m in c.get("volumeMounts", []) if m["name"] in claims), None)
    if mount is None or not (arg_value(eargs, "--data-dir") or "").startswith(
            mount["mountPath"].rstrip("/") + "/"):
        ck.err(where, f"--data-dir {arg_value(eargs, '--data-dir')} is not on a volumeClaimTemplate: "
                      "the cluster state would die with the pod")
    # Probes: the plain-HTTP metrics listener (the client port asks for a certificate).
    mport = port_of(arg_value(eargs, "--listen-metrics-urls"))
    if not (arg_value(eargs, "--listen-metrics-urls") or "").startswith("http://"):
        ck.err(where, "--listen-metrics-urls must be plain http:// for the kubelet's probes")
    for probe in ("readinessProbe", "livenessProbe"):
        g = (c.get(probe) or {}).get("httpGet") or {}
        if g.get("path") != "/health" or container_port(c, g.get("port")) != mport:
            ck.err(where, f"{probe} must ask /health on the metrics port {mport}, asks "
                          f"{g.get('path')} on {g.get('port')}")
    # The datapath dials every member, under the scheme the members serve.
    want_eps = ",".join(f"{host(i)}:{client}" for i in range(n))
    if endpoints != want_eps:
        ck.err(dp_where, f"--cluster-etcd={endpoints}, want every member: {want_eps}")
    if insecure == secure:
        ck.err(dp_where, f"--cluster-etcd-insecure is {insecure} but etcd's client-cert-auth is {secure}")


def check_certs(ck, ctl_secret, dp_secret, controller_host):
    """The generated certificates: same CA, each chains to it, the controller's carries the name
    the datapaths dial, the datapath's carries a DNS name, both allow client and server auth."""
    with tempfile.TemporaryDirectory() as tmp:
        def write(secret, key):
            p = os.path.join(tmp, f"{secret['metadata']['name']}-{key}")
            with open(p, "wb") as f:
                f.write(base64.b64decode(secret["data"][key]))
            return p

        for s in (ctl_secret, dp_secret):
            if set(s.get("data", {})) != {"ca.crt", "tls.crt", "tls.key"}:
                ck.err(f"Secret/{s['metadata']['name']}", "must hold exactly ca.crt, tls.crt, tls.key")
                return
        if ctl_secret["data"]["ca.crt"] != dp_secret["data"]["ca.crt"]:
            ck.err("TLS", "the controller and datapath secrets carry different CAs")
        for s, want_name in ((ctl_secret, controller_host), (dp_secret, None)):
            where = f"Secret/{s['metadata']['name']}"
            ca, crt, key = write(s, "ca.crt"), write(s, "tls.crt"), write(s, "tls.key")
            v = subprocess.run(["openssl", "verify", "-CAfile", ca, crt], capture_output=True, text=True)
            if v.returncode != 0:
                ck.err(where, f"tls.crt does not chain to ca.crt: {v.stdout}{v.stderr}")
            text = subprocess.run(["openssl", "x509", "-in", crt, "-noout", "-text"],
                                  capture_output=True, text=True).stdout
            if "TLS Web Server Authentication" not in text or "TLS Web Client Authentication" not in text:
                ck.err(where, "tls.crt must allow both server and client authentication (mTLS both ways)")
            sans = re.findall(r"DNS:([^,\s]+)", text)
            if want_name and want_name not in sans:
                ck.err(where, f"tls.crt names {sans}, not {want_name} (what datapaths dial)")
            if not sans:
                ck.err(where, "tls.crt has no DNS subjectAltName")
            pub_crt = subprocess.run(["openssl", "x509", "-in", crt, "-noout", "-pubkey"],
                                     capture_output=True, text=True).stdout
            pub_key = subprocess.run(["openssl", "pkey", "-in", key, "-pubout"],
                                     capture_output=True, text=True).stdout
            if not pub_crt or pub_crt != pub_key:
                ck.err(where, "tls.key does not match tls.crt")


def check_examples(ck, docs, examples_dirs):
    classes = {d["metadata"]["name"] for d in docs if d.get("kind") == "StorageClass"}
    snap_classes = {d["metadata"]["name"] for d in docs if d.get("kind") == "VolumeSnapshotClass"}
    vacs = {d["metadata"]["name"] for d in docs if d.get("kind") == "VolumeAttributesClass"}
    ex = []
    # Several directories are one set of examples (examples/backup uses examples/pvc.yaml's claim).
    for examples_dir in examples_dirs:
        files = sorted(f for f in os.listdir(examples_dir) if f.endswith(".yaml"))
        if not files:
            ck.err(examples_dir, "no examples")
        rel = os.path.basename(os.path.normpath(examples_dir))
        for f in files:
            with open(os.path.join(examples_dir, f), encoding="utf-8") as fh:
                for d in yaml.safe_load_all(fh):
                    if d:
                        ex.append((f if rel == "examples" else f"{rel}/{f}", d))
    pvcs = {d["metadata"]["name"]: d for _, d in ex if d["kind"] == "PersistentVolumeClaim"}
    snaps = {d["metadata"]["name"] for _, d in ex if d["kind"] == "VolumeSnapshot"}
    contents = {d["metadata"]["name"]: d for _, d in ex if d["kind"] == "VolumeSnapshotContent"}
    for f, d in ex:
        where = f"examples/{f} {d['kind']}/{d['metadata']['name']}"
        spec = d.get("spec", {})
        if d["kind"] == "PersistentVolumeClaim":
            if spec.get("storageClassName") not in classes:
                ck.err(where, f"storageClassName {spec.get('storageClassName')!r} is not in the chart "
                              f"({', '.join(sorted(classes))})")
            vac = spec.get("volumeAttributesClassName")
            if vac is not None and vac not in vacs:
                ck.err(where, f"volumeAttributesClassName {vac!r} is not in the chart")
            ds = spec.get("dataSource")
            if ds:
                if ds.get("kind") == "VolumeSnapshot" and ds.get("name") not in snaps:
                    ck.err(where, f"restores from {ds.get('name')!r}, which no example creates")
                if ds.get("kind") == "PersistentVolumeClaim":
                    src = pvcs.get(ds.get("name"))
                    if src is None:
                        ck.err(where, f"clones {ds.get('name')!r}, which no example creates")
                    elif src["spec"].get("storageClassName") != spec.get("storageClassName"):
                        ck.err(where, "a clone must use its source's StorageClass")
        elif d["kind"] == "VolumeSnapshot":
            if spec.get("volumeSnapshotClassName") not in snap_classes:
                ck.err(where, f"volumeSnapshotClassName {spec.get('volumeSnapshotClassName')!r} "
                              "is not in the chart")
            pre = spec.get("source", {}).get("volumeSnapshotContentName")
            if pre is not None:
                if pre not in contents:
                    ck.err(where, f"binds VolumeSnapshotContent {pre!r}, which no example creates")
            elif spec.get("source", {}).get("persistentVolumeClaimName") not in pvcs:
                ck.err(where, "snapshots a PVC that no example creates")
        elif d["kind"] == "VolumeSnapshotContent":
            # A pre-provisioned snapshot: ours, a backup's handle (the only kind another cluster
            # can use), a class the chart makes, and bound to an example's VolumeSnapshot.
            if spec.get("driver") != DRIVER:
                ck.err(where, f"driver {spec.get('driver')!r} is not {DRIVER}")
            if not spec.get("source", {}).get("snapshotHandle", "").startswith("b1:s3://"):
                ck.err(where, "snapshotHandle is not a backup's (b1:s3://BUCKET/PREFIX#NAME)")
            if spec.get("volumeSnapshotClassName") not in snap_classes:
                ck.err(where, f"volumeSnapshotClassName {spec.get('volumeSnapshotClassName')!r} "
                              "is not in the chart")
            if spec.get("volumeSnapshotRef", {}).get("name") not in snaps:
                ck.err(where, "is bound to a VolumeSnapshot that no example creates")
        elif d["kind"] == "Secret":
            pass
        elif d["kind"] == "Pod":
            for v in spec.get("volumes", []):
                claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is None:
                    continue
                if claim not in pvcs:
                    ck.err(where, f"mounts claim {claim!r}, which no example creates")
                    continue
                block = pvcs[claim]["spec"].get("volumeMode") == "Block"
                uses = ("volumeDevices" if block else "volumeMounts")
                if not any(x["name"] == v["name"] for c in spec["containers"] for x in c.get(uses, [])):
                    ck.err(where, f"claim {claim} ({'Block' if block else 'Filesystem'}) "
                                  f"must be used through {uses}")


def self_test(ck_factory, docs, expect_secrets):
    """Each mutation breaks one property; the checker must report it. A checker that passes
    everything would pass the real manifests too, so this is what makes the check worth running."""
    def find(ds, binary):
        for _, _, pod in pods_of(ds):
            for c in pod["containers"]:
                if binary_of(c) == binary:
                    return pod, c
        raise KeyError(binary)

    def set_arg(c, flag, value):
        c["args"] = [a for a in c["args"] if not a.startswith(flag + "=")] + [f"{flag}={value}"]

    def move_datapath_into_node(ds):
        _, dp = find(ds, "nbd-datapathd")
        pod, _ = find(ds, "nbd-csi-node")
        pod["containers"].append(copy.deepcopy(dp))

    def sc_param(ds):
        sc = next(d for d in ds if d.get("kind") == "StorageClass")
        sc.setdefault("parameters", {})["maxIOPS"] = "10"

    def reg_path(ds):
        pod, _ = find(ds, "nbd-csi-node")
        reg = next(c for c in pod["containers"] if "registrar" in c["image"])
        set_arg(reg, "--kubelet-registration-path", "/var/lib/kubelet/plugins/other.csi.io/csi.sock")

    def mount_typo(ds):
        pod, c = find(ds, "nbd-csi-controller")
        prov = next(x for x in pod["containers"] if "csi-provisioner" in x["image"])
        prov["volumeMounts"][0]["mountPath"] = "/csi-socket"

    def missing_env(ds):
        _, c = find(ds, "nbd-datapathd")
        c["env"] = [e for e in c["env"] if e["name"] != "HOST_IP"]

    def drop_required(ds):
        _, c = find(ds, "nbd-datapathd")
        c["args"] = [a for a in c["args"] if not a.startswith("--pool")]

    mutations = {
        "unknown controller flag": lambda ds: find(ds, "nbd-csi-controller")[1]["args"].append("--no-such-flag=1"),
        "node dials another datapath socket": lambda ds: set_arg(find(ds, "nbd-csi-node")[1], "--datapath", "unix:///run/other/datapath.sock"),
        "datapath inside the node plugin pod": move_datapath_into_node,
        "unknown StorageClass parameter": sc_param,
        "driver name": lambda ds: next(d for d in ds if d.get("kind") == "CSIDriver")["metadata"].update(name="nbd.csi.example"),
        "registration path": reg_path,
        "sidecar mount typo": mount_typo,
        "undefined $(VAR)": missing_env,
        "required flag dropped": drop_required,
        "misspelt field": lambda ds: find(ds, "nbd-csi-node")[1]["volumeMounts"][1].update(mountPropogation="Bidirectional"),
        "value out of range": lambda ds: set_arg(find(ds, "nbd-datapathd")[1], "--attach-dead-conn-timeout", "999999"),
        "sidecar flag typo": lambda ds: next(c for _, _, p in pods_of(ds) for c in p["containers"] if "csi-resizer" in c.get("image", ""))["args"].append("--leader-electon"),
        "node plugin socket off the host": lambda ds: set_arg(find(ds, "nbd-csi-node")[1], "--csi-endpoint", "unix:///tmp/csi.sock"),
        "controller as root": lambda ds: find(ds, "nbd-csi-controller")[0]["securityContext"].update(runAsUser=0, runAsNonRoot=False),
        "sidecar as root": lambda ds: next(c for c in find(ds, "nbd-csi-controller")[0]["containers"] if "csi-resizer" in c["image"])["securityContext"].update(runAsUser=0),
        "no readiness probe": lambda ds: find(ds, "nbd-datapathd")[1].pop("readinessProbe"),
        "no memory limit": lambda ds: find(ds, "nbd-csi-node")[1]["resources"].pop("limits"),
        "blank-volume class binds Immediately": lambda ds: next(d for d in ds if d.get("kind") == "StorageClass" and not d["metadata"]["name"].endswith("-restore")).update(volumeBindingMode="Immediate"),
        "capacity without storageCapacity": lambda ds: next(d for d in ds if d.get("kind") == "CSIDriver")["spec"].update(storageCapacity=False),
        "node readiness off the metrics port": lambda ds: set_arg(find(ds, "nbd-csi-node")[1], "--metrics-listen", "0.0.0.0:9999"),
        "controller readiness not /readyz": lambda ds: find(ds, "nbd-csi-controller")[1]["readinessProbe"]["httpGet"].update(path="/healthz"),
    }
    etcd_sts = [wl for _, wl, pod in pods_of(docs)
                if any(binary_of(c) == "etcd" for c in pod["containers"])]
    if etcd_sts:
        def etcd_c(ds):
            return next(c for _, _, p in pods_of(ds) for c in p["containers"] if binary_of(c) == "etcd")

        def dp_c(ds):
            return find(ds, "nbd-datapathd")[1]

        def etcd_wl(ds):
            return next(wl for _, wl, p in pods_of(ds) if any(binary_of(c) == "etcd" for c in p["containers"]))

        def flip_client_tls(ds):
            c = dp_c(ds)
            was = has_flag(c["args"], "--cluster-etcd-insecure")
            c["args"] = [a for a in c["args"] if not a.startswith("--cluster-etcd-tls-")
                         and a != "--cluster-etcd-insecure"]
            if was:
                c["args"] += [f"--cluster-etcd-tls-{k}=/etc/nbd-csi/tls/{f}"
                              for k, f in (("cert", "tls.crt"), ("key", "tls.key"), ("ca", "ca.crt"))]
            else:
                c["args"].append("--cluster-etcd-insecure")

        def shared_cert(ds):
            pod, _ = find(ds, "nbd-datapathd")
            vol = next(v for v in pod["volumes"] if v["name"] == "tls")
            vol.pop("hostPath")
            vol["secret"] = {"secretName": "nbd-csi-datapath-tls"}

        mutations.update({
            "etcd flag typo": lambda ds: etcd_c(ds)["args"].append("--client-cert-auht"),
            "even etcd members": lambda ds: etcd_wl(ds)["spec"].update(replicas=2),
            "datapath misses etcd members": lambda ds: set_arg(dp_c(ds), "--cluster-etcd", arg_value(dp_c(ds)["args"], "--cluster-etcd").split(",")[0] + ",extra:2379"),
            "replica endpoint is a wildcard": lambda ds: set_arg(dp_c(ds), "--cluster-nbd-endpoint", "tcp://0.0.0.0:9824"),
            "etcd data off its volume": lambda ds: set_arg(etcd_c(ds), "--data-dir", "/tmp/etcd"),
            "etcd probe on the client port": lambda ds: etcd_c(ds)["readinessProbe"]["httpGet"].update(port="client"),
            "shared datapath certificate": shared_cert,
            "datapath TLS mismatch with etcd": flip_client_tls,
            "etcd member names": lambda ds: set_arg(etcd_c(ds), "--name", "etcd"),
        })
    failures = []
    for name, mutate in mutations.items():
        ds = copy.deepcopy(docs)
        mutate(ds)
        ck = ck_factory()
        check(ck, ds, expect_secrets)
        if not ck.errors:
            failures.append(name)
        else:
            print(f"self-test: {name}: caught ({ck.errors[0]})")
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--src", required=True)
    ap.add_argument("--examples", action="append", help="an examples directory (repeatable)")
    ap.add_argument("--expect-secrets", action="store_true",
                    help="the rendering holds the generated TLS secrets: verify the certificates")
    ap.add_argument("--self-test", action="store_true",
                    help="also check that deliberately broken copies are rejected")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()

    docs = []
    for f in a.files:
        with open(f, encoding="utf-8") as fh:
            docs.extend(d for d in yaml.safe_load_all(fh) if d)
    ck = Checker(a.bin_dir, a.src)
    ck.check_params_header()
    check(ck, docs, a.expect_secrets)
    if a.examples:
        check_examples(ck, docs, a.examples)
    status = 0
    if ck.errors:
        print(f"check_manifests: {len(ck.errors)} problem(s) in {' '.join(a.files)}:")
        for e in ck.errors:
            print(f"  {e}")
        status = 1
    else:
        print(f"check_manifests: {len(docs)} objects in {' '.join(a.files)}: all checks passed")
    if a.self_test and status == 0:
        failures = self_test(lambda: Checker(a.bin_dir, a.src), docs, a.expect_secrets)
        if failures:
            print(f"self-test: not caught: {', '.join(failures)}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
