#!/usr/bin/env bash
# The deploy tests (ctest -L deploy): the Helm chart, manifests/ and examples/.
#   deploy_test.sh lint|template|drift|check|version|kernel-nbd
# Needs helm (scripts/get-helm.sh fetches it once); without it the test is skipped (77),
# unless CI=true, where a missing helm is a failure.
set -euo pipefail
src=${NBDCSI_SRC:?NBDCSI_SRC is set by CTest}
bin=${NBDCSI_BIN:?NBDCSI_BIN is set by CTest}
chart=$src/charts/nbd-csi
what=${1:?usage: deploy_test.sh lint|template|drift|check|version|kernel-nbd}

skip_or_fail() {
  if [ "${CI:-}" = true ]; then echo "FAIL: $*" >&2; exit 1; fi
  echo "SKIP: $*" >&2
  exit 77
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ "$what" != version ]; then
  helm=$("$src/scripts/get-helm.sh" 2>"$tmp/get-helm.err") ||
    skip_or_fail "no helm: $(cat "$tmp/get-helm.err")"
fi

case $what in
  template|check)
    python3 -c 'import yaml' 2>/dev/null || skip_or_fail "python3 has no yaml module (apt-get install python3-yaml)" ;;
esac

# Value sets every rendering test goes through: the defaults, and each optional branch.
# Generating the certificates (three RSA keys) is most of a rendering's time, so only the
# defaults do it; the other sets name existing secrets or use cert-manager.
# helm template knows no cluster: it assumes its own Kubernetes version (v1.32 for the pinned
# helm) and only the built-in API groups, so what a cluster would serve is passed explicitly
# (--api-versions), and kube-1.20 renders for the oldest supported Kubernetes.
secrets="--set tls.existingSecret.controller=nbd-csi-controller-tls --set tls.existingSecret.datapath=nbd-csi-datapath-tls"
snap_api="--api-versions snapshot.storage.k8s.io/v1"
vac_api="--api-versions storage.k8s.io/v1beta1/VolumeAttributesClass"
# Cluster mode (replicated volumes) needs per-node datapath certificates.
per_node="--set tls.datapathHostPath=/etc/nbd-csi/node-tls --set tls.verifyDatapathServerName=false"
cluster="$per_node --set cluster.enabled=true"
value_sets() {
  echo "defaults|"
  echo "existing-secrets|$secrets"
  echo "cert-manager|--set tls.certManager.enabled=true"
  echo "cert-manager-issuer|--set tls.certManager.enabled=true --set tls.certManager.issuerRef.name=ca --set tls.certManager.issuerRef.kind=ClusterIssuer"
  echo "vac|$secrets $snap_api $vac_api --set volumeAttributesClasses.enabled=true"
  echo "rolling-datapath|$secrets --set datapath.updateStrategy.type=RollingUpdate --set datapath.capacity=100Gi"
  echo "kube-1.20|$secrets $snap_api --kube-version 1.20.2"
  echo "kernel-nbd-required|$secrets --set datapath.kernelNbd.mode=required"
  echo "per-node-certs|--set tls.existingSecret.controller=nbd-csi-controller-tls --set tls.datapathHostPath=/etc/nbd-csi/node-tls --set tls.verifyDatapathServerName=false"
  echo "monitoring|$secrets --api-versions monitoring.coreos.com/v1 --set monitoring.labels.release=kps --set monitoring.grafanaDashboard.enabled=true --set node.metrics.enabled=false"
  echo "cluster-etcd-3|--set tls.certManager.enabled=true $cluster --set cluster.etcd.deploy.replicas=3 --set cluster.etcd.deploy.storage.storageClassName=local-path"
  echo "cluster-etcd-secret|--set tls.existingSecret.controller=nbd-csi-controller-tls $cluster --set cluster.etcd.deploy.tls.existingSecret=nbd-csi-etcd-tls --set cluster.leaseTTLSeconds=15 --set cluster.replicaConnections=4 --set cluster.prefix=/prod/nbd-csi/"
  echo "cluster-etcd-insecure|--set tls.existingSecret.controller=nbd-csi-controller-tls $cluster --set cluster.etcd.insecure=true"
  echo "cluster-external|--set tls.existingSecret.controller=nbd-csi-controller-tls $cluster --set cluster.etcd.external.endpoints[0]=etcd-a.example:2379 --set cluster.etcd.external.endpoints[1]=10.0.0.7:2379 --set cluster.etcd.external.tlsSecret=etcd-client"
  echo "health-monitor|$secrets --set controller.healthMonitor.enabled=true --set controller.healthMonitor.interval=30s"
  echo "backup|$secrets $snap_api $vac_api --set volumeAttributesClasses.enabled=true --set backup.enabled=true --set backup.target=s3://backups/cluster-a --set backup.bandwidth=50Mi --set backup.secretNamespace=storage"
  echo "backup-schedules|$secrets --set backup.enabled=true --set backup.target=s3://backups/x"
  echo "host-network|$secrets --set controller.hostNetwork=true --set controller.replicas=1 --set node.hostNetwork=true --set controller.apiServerAddress=127.0.0.1:6443 --set datapath.hostAliases[0].ip=127.0.0.1 --set datapath.hostAliases[0].hostnames[0]=nbd-csi-controller.nbd-csi.svc"
}

case $what in
  lint)
    # lint takes --kube-version but no --api-versions (and reports a template's `fail` as INFO,
    # not an error): the template test is where rendering with served APIs is checked.
    while IFS='|' read -r name args; do
      lint_args=$(echo " $args " | sed -e 's/ --api-versions [^ ]*//g')
      # shellcheck disable=SC2086
      "$helm" lint --strict "$chart" $lint_args >"$tmp/lint.out" 2>&1 || {
        cat "$tmp/lint.out" >&2; echo "FAIL: helm lint ($name)" >&2; exit 1; }
      grep -q '0 chart(s) failed' "$tmp/lint.out" || { cat "$tmp/lint.out" >&2; exit 1; }
      echo "ok: helm lint --strict ($name)"
    done < <(value_sets)
    # values.schema.json: lint refuses values of the wrong type or out of range, naming them.
    lint_refuses() {  # expected-message args...
      local want=$1; shift
      if "$helm" lint --strict "$chart" "$@" >"$tmp/lint.out" 2>&1; then
        echo "FAIL: helm lint $* passed; the schema should refuse it" >&2; exit 1
      fi
      grep -q -- "$want" "$tmp/lint.out" || {
        echo "FAIL: helm lint $*: output lacks '$want':" >&2; cat "$tmp/lint.out" >&2; exit 1; }
      echo "ok: lint refused $* ($want)"
    }
    lint_refuses "controller.replicas: Invalid type. Expected: integer" --set controller.replicas=banana
    lint_refuses "datapath.overcommit" --set datapath.overcommit=-1
    lint_refuses 'logLevel must be one of the following: "trace", "debug", "info", "warn", "error"' --set logLevel=verbose
    lint_refuses 'logFormat must be one of the following: "text", "json"' --set logFormat=xml
    lint_refuses "cluster.etcd.deploy.replicas must be one of the following: 1, 3, 5" \
      --set cluster.etcd.deploy.replicas=2
    lint_refuses "cluster.leaseTTLSeconds: Must be greater than or equal to 2" --set cluster.leaseTTLSeconds=1
    # A StorageClass with replicas: only 1 to 3, and 2 or 3 only where the controller has etcd.
    # (The chart's own checks, which helm lint reports as INFO only: helm template must fail.)
    template_refuses() {  # expected-message args...
      local want=$1; shift
      if "$helm" template t "$chart" "$@" >"$tmp/tpl.out" 2>&1; then
        echo "FAIL: helm template $* passed; the chart should refuse it" >&2; exit 1
      fi
      grep -q -- "$want" "$tmp/tpl.out" || {
        echo "FAIL: helm template $*: output lacks '$want':" >&2; cat "$tmp/tpl.out" >&2; exit 1; }
      echo "ok: template refused $* ($want)"
    }
    template_refuses "storageClasses x: replicas 2 needs cluster.enabled=true" \
      --set 'storageClasses[0].name=x' --set 'storageClasses[0].parameters.replicas=2'
    template_refuses 'storageClasses x: replicas "4" must be 1, 2 or 3' \
      --set 'storageClasses[0].name=x' --set 'storageClasses[0].parameters.replicas=4'
    # The chart README's values table names every value (a wildcard may stand for one level).
    python3 - "$chart/values.yaml" "$chart/README.md" <<'PY'
import re, sys, yaml
values, readme = yaml.safe_load(open(sys.argv[1])), open(sys.argv[2]).read()
named = set(re.findall(r"^\| (.*?) \|", readme, re.M))
named = {n for cell in named for n in re.findall(r"`([^`]+)`", cell)}
opaque = {"resources", "nodeSelector", "tolerations", "affinity", "issuerRef", "parameters", "labels"}
def leaves(d, path=()):
    for k, v in d.items():
        p = path + (k,)
        if isinstance(v, dict) and v and k not in opaque:
            yield from leaves(v, p)
        else:
            yield p
def documented(p):
    forms = [".".join(p)] + [".".join(p[:i] + ("*",) + p[i + 1:]) for i in range(len(p))]
    return any(f in named for f in forms)
missing = [".".join(p) for p in leaves(values) if not documented(p)]
if missing:
    sys.exit(f"FAIL: charts/nbd-csi/README.md's values table lacks {', '.join(missing)}")
print(f"ok: the chart README's values table names all {sum(1 for _ in leaves(values))} values")
PY
    ;;

  template)
    while IFS='|' read -r name args; do
      # shellcheck disable=SC2086
      "$helm" template t "$chart" -n ns $args >"$tmp/out.yaml" 2>"$tmp/err" || {
        cat "$tmp/err" >&2; echo "FAIL: helm template ($name)" >&2; exit 1; }
      # Every document parses and names itself; CSIDriver and the three workloads are there.
      python3 - "$tmp/out.yaml" "$name" "$chart/files/prometheus-rules.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {}
for d in docs:
    assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
    kinds.setdefault(d["kind"], []).append(d["metadata"]["name"])
for k, n in (("CSIDriver", 1), ("Deployment", 1), ("DaemonSet", 2)):
    assert len(kinds.get(k, [])) == n, f"{sys.argv[2]}: {k}: {kinds.get(k)}"
name = sys.argv[2]
if name == "defaults":
    assert len(kinds.get("Secret", [])) == 2, kinds
if name == "existing-secrets":
    assert "Secret" not in kinds and "Certificate" not in kinds, kinds
if name.startswith("cert-manager"):
    assert len(kinds.get("Certificate", [])) == (3 if name == "cert-manager" else 2), kinds
    assert "Secret" not in kinds, kinds
if name == "vac":
    assert len(kinds.get("VolumeAttributesClass", [])) == 2, kinds
if name == "per-node-certs":
    # Each node's own certificate directory instead of the shared secret, and the controller
    # checks certificates against nodes instead of one name.
    assert "Secret" not in kinds, kinds
    dp = next(d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-datapath"))
    tls = next(v for v in dp["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls == {"name": "tls", "hostPath": {"path": "/etc/nbd-csi/node-tls", "type": "Directory"}}, tls
    ctl = next(c for d in docs if d["kind"] == "Deployment"
               for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "nbd-csi-controller")
    assert not any(a.startswith("--datapath-server-name") for a in ctl["args"]), ctl["args"]
# The VolumeSnapshotClass (create: auto) only where the cluster serves its API.
assert len(kinds.get("VolumeSnapshotClass", [])) == {"vac": 1, "kube-1.20": 1, "backup": 2}.get(name, 0), kinds
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
# backup.enabled: the backup VolumeSnapshotClass with its target and the secret for create,
# delete and list; the restore StorageClass with the provisioner secret; Secrets readable by the
# provisioner and the snapshotter then, and only then.
secret_rules = {d["metadata"]["name"]: r["verbs"] for d in docs if d["kind"] == "ClusterRole"
                for r in d["rules"] if "secrets" in r["resources"]}
if name == "backup":
    vsc = by[("VolumeSnapshotClass", "nbd-csi-backup")]
    p = vsc["parameters"]
    assert p["backupTarget"] == "s3://backups/cluster-a" and p["backupBandwidth"] == "50Mi", p
    for use in ("snapshotter", "snapshotter-list"):
        assert p[f"csi.storage.k8s.io/{use}-secret-name"] == "nbd-csi-backup", p
        assert p[f"csi.storage.k8s.io/{use}-secret-namespace"] == "storage", p
    sc = by[("StorageClass", "nbd-csi-backup-restore")]
    assert sc["volumeBindingMode"] == "Immediate", sc
    assert sc["parameters"]["csi.storage.k8s.io/provisioner-secret-name"] == "nbd-csi-backup", sc
    assert sc["parameters"]["csi.storage.k8s.io/provisioner-secret-namespace"] == "storage", sc
    assert sorted(secret_rules) == ["t-nbd-csi-provisioner", "t-nbd-csi-snapshotter"], secret_rules
    # Scheduled backups: the Secret is in another namespace here, so it cannot be mounted.
    dpc_args = next(c for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-datapath")
                    for c in d["spec"]["template"]["spec"]["containers"])["args"]
    assert not any(a.startswith("--backup-secret-dir") for a in dpc_args), dpc_args
elif name == "backup-schedules":
    assert sorted(secret_rules) == ["t-nbd-csi-provisioner", "t-nbd-csi-snapshotter"], secret_rules
    dp = next(d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-datapath"))
    pod = dp["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "--backup-secret-dir=/etc/nbd-csi/backup-secret" in c["args"], c["args"]
    assert {"name": "backup-secret", "mountPath": "/etc/nbd-csi/backup-secret", "readOnly": True} in c["volumeMounts"], c["volumeMounts"]
    vol = next(v for v in pod["volumes"] if v["name"] == "backup-secret")
    assert vol["secret"] == {"secretName": "nbd-csi-backup", "defaultMode": 0o400, "optional": True}, vol
else:
    assert not secret_rules, (name, secret_rules)
drv = next(d for d in docs if d["kind"] == "CSIDriver")
prov = next(c for d in docs if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "csi-provisioner")
pdb = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
if name == "kube-1.20":
    # No CSIStorageCapacity v1 before 1.24, no policy/v1 before 1.21.
    assert drv["spec"]["storageCapacity"] is False, drv
    assert "--enable-capacity" not in prov["args"], prov["args"]
    assert [p["apiVersion"] for p in pdb] == ["policy/v1beta1"], pdb
elif name == "host-network":
    assert not pdb, pdb  # one replica: nothing to keep available
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    assert all(p.get("hostNetwork") for p in pods), "every pod on the host network"
    env = {e["name"]: e.get("value") for e in prov["env"]}
    assert env.get("KUBERNETES_SERVICE_HOST") == "127.0.0.1" and env.get("KUBERNETES_SERVICE_PORT") == "6443", env
else:
    assert drv["spec"]["storageCapacity"] is True, drv
    assert "--enable-capacity" in prov["args"], prov["args"]
    assert [p["apiVersion"] for p in pdb if "etcd" not in p["metadata"]["name"]] == ["policy/v1"], pdb
# Cluster mode: the etcd StatefulSet and its headless Service unless external endpoints are
# given; the datapath's --cluster-* flags and its replica port either way; nothing of it off.
sts = [d for d in docs if d["kind"] == "StatefulSet"]
dpc = next(c for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-datapath")
           for c in d["spec"]["template"]["spec"]["containers"])
cl = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else True for a in dpc["args"] if a.startswith("--cluster-")}
if name.startswith("cluster-"):
    svc = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert dpc["args"].count("--nbd-listen=tcp://$(HOST_IP):9824") == 1, dpc["args"]
    assert cl["--cluster-nbd-endpoint"] == "tcp://$(HOST_IP):9824", cl
    assert {"name": "nbd", "containerPort": 9824, "hostPort": 9824, "protocol": "TCP"} in dpc["ports"], dpc["ports"]
    assert "--nbd-tls-cert=/etc/nbd-csi/tls/tls.crt" in dpc["args"], dpc["args"]
    if name == "cluster-external":
        assert not sts and "t-nbd-csi-etcd" not in svc, (sts, sorted(svc))
        assert cl["--cluster-etcd"] == "etcd-a.example:2379,10.0.0.7:2379", cl
        assert cl["--cluster-etcd-tls-cert"] == "/etc/nbd-csi/etcd-tls/tls.crt", cl
        vols = next(d for d in docs if d["kind"] == "DaemonSet" and
                    d["metadata"]["name"].endswith("-datapath"))["spec"]["template"]["spec"]["volumes"]
        assert {"name": "etcd-tls", "secret": {"secretName": "etcd-client", "defaultMode": 0o400}} in vols, vols
    else:
        n = 3 if name == "cluster-etcd-3" else 1
        assert [s["metadata"]["name"] for s in sts] == ["t-nbd-csi-etcd"], sts
        assert sts[0]["spec"]["replicas"] == n, sts[0]["spec"]
        assert svc["t-nbd-csi-etcd"]["spec"]["clusterIP"] == "None", svc["t-nbd-csi-etcd"]
        members = [f"t-nbd-csi-etcd-{i}.t-nbd-csi-etcd.ns.svc:2379" for i in range(n)]
        assert cl["--cluster-etcd"] == ",".join(members), cl
        pod = sts[0]["spec"]["template"]["spec"]
        anti = (pod.get("affinity") or {}).get("podAntiAffinity")
        assert bool(anti) == (n > 1), pod.get("affinity")
        pdbs = [p["metadata"]["name"] for p in pdb if "etcd" in p["metadata"]["name"]]
        assert pdbs == (["t-nbd-csi-etcd"] if n > 1 else []), pdbs
        claim = sts[0]["spec"]["volumeClaimTemplates"][0]["spec"]
        assert claim.get("storageClassName") == ("local-path" if n > 1 else None), claim
        etcd_args = pod["containers"][0]["args"]
        if name == "cluster-etcd-insecure":
            assert cl.get("--cluster-etcd-insecure") is True and "--client-cert-auth" not in etcd_args, (cl, etcd_args)
            assert "--listen-client-urls=http://0.0.0.0:2379" in etcd_args, etcd_args
        else:
            assert "--cluster-etcd-insecure" not in cl and "--client-cert-auth" in etcd_args, (cl, etcd_args)
            assert cl["--cluster-etcd-tls-cert"] == "/etc/nbd-csi/tls/tls.crt", cl
        if name == "cluster-etcd-3":
            cert = next(d for d in docs if d["kind"] == "Certificate" and d["metadata"]["name"] == "t-nbd-csi-etcd")
            assert cert["spec"]["secretName"] == "t-nbd-csi-etcd-tls", cert
        if name == "cluster-etcd-secret":
            assert (cl["--cluster-lease-ttl"], cl["--cluster-prefix"]) == ("15", "/prod/nbd-csi/"), cl
            assert "--replica-connections=4" in dpc["args"], dpc["args"]
            tlsvol = next(v for v in pod["volumes"] if v["name"] == "tls")
            assert tlsvol["secret"]["secretName"] == "nbd-csi-etcd-tls", tlsvol
else:
    assert not sts and not cl and not any(a.startswith("--nbd-listen=tcp") for a in dpc["args"]), (sts, dpc["args"])
# controller.healthMonitor: the external-health-monitor-controller sidecar on the controller's
# socket, with its RBAC (PVs, PVCs, pods, nodes; events; its lease), only when enabled.
ctl_pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
hm = [c for c in ctl_pod["containers"] if c["name"] == "csi-external-health-monitor-controller"]
hm_rbac = {d["kind"]: d for d in docs if d["metadata"]["name"] == "t-nbd-csi-health-monitor"}
if name == "health-monitor":
    assert len(hm) == 1, [c["name"] for c in ctl_pod["containers"]]
    assert hm[0]["image"] == "registry.k8s.io/sig-storage/csi-external-health-monitor-controller:v0.15.0", hm[0]
    assert hm[0]["args"] == ["--csi-address=/csi/csi.sock", "--leader-election", "--timeout=60s",
                             "--list-volumes-interval=30s", "--monitor-interval=30s"], hm[0]["args"]
    assert {"name": "socket-dir", "mountPath": "/csi"} in hm[0]["volumeMounts"], hm[0]
    assert hm[0]["securityContext"]["readOnlyRootFilesystem"] is True, hm[0]["securityContext"]
    assert sorted(hm_rbac) == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"], sorted(hm_rbac)
    granted = {}
    for r in hm_rbac["ClusterRole"]["rules"]:
        for res in r["resources"]:
            granted.setdefault(res, set()).update(r["verbs"])
    for res in ("persistentvolumes", "persistentvolumeclaims", "pods", "nodes"):
        assert {"get", "list", "watch"} <= granted.get(res, set()), (res, granted)
    assert {"create", "patch"} <= granted.get("events", set()), granted
    assert hm_rbac["Role"]["rules"][0]["resources"] == ["leases"], hm_rbac["Role"]
    for b in ("ClusterRoleBinding", "RoleBinding"):
        assert hm_rbac[b]["subjects"][0]["name"] == ctl_pod["serviceAccountName"], hm_rbac[b]
else:
    assert not hm and not hm_rbac, (name, hm, sorted(hm_rbac))
if name == "monitoring":
    # One PodMonitor per daemon with metrics on (the node's are off here), under the job names
    # the alerting rules match; the rules file whole as the PrometheusRule; the dashboard parses.
    import json
    mons = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    assert sorted(mons) == ["t-nbd-csi-controller", "t-nbd-csi-datapath"], sorted(mons)
    rules_text = open(sys.argv[3]).read()
    for comp, job in (("controller", "nbd-csi-controller"), ("datapath", "nbd-datapathd")):
        m = mons["t-nbd-csi-" + comp]
        assert m["metadata"]["labels"]["release"] == "kps", m["metadata"]
        assert m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == comp, m
        ep = m["spec"]["podMetricsEndpoints"][0]
        assert ep["port"] == "metrics" and ep["path"] == "/metrics", ep
        assert {"targetLabel": "job", "replacement": job} in ep["relabelings"], ep
        assert job in rules_text, job
        # The pods it selects have a port named metrics.
        w = next(d for d in docs if d["kind"] in ("Deployment", "DaemonSet")
                 and d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == comp)
        ports = [p["name"] for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        assert "metrics" in ports, (comp, ports)
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(rules_text), "PrometheusRule differs from the rules file"
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "t-nbd-csi-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", cm["metadata"]
    assert json.loads(cm["data"]["nbd-csi.json"])["panels"], "dashboard without panels"
elif "PodMonitor" in kinds or "PrometheusRule" in kinds:
    sys.exit(f"FAIL: {name}: Prometheus Operator objects without the API served: {kinds}")
print(f"ok: helm template ({name}): {len(docs)} objects")
PY
    done < <(value_sets)
    # Values that would deploy something broken are refused with a message naming the value.
    refuse() {  # expected-message args...
      local want=$1; shift
      if "$helm" template t "$chart" "$@" >/dev/null 2>"$tmp/err"; then
        echo "FAIL: helm template $* succeeded; it should refuse" >&2; exit 1
      fi
      grep -q -- "$want" "$tmp/err" || {
        echo "FAIL: helm template $*: error lacks '$want':" >&2; cat "$tmp/err" >&2; exit 1; }
      echo "ok: refused $* ($want)"
    }
    refuse "set both controller and datapath" --set tls.existingSecret.controller=x
    refuse "monitoring.podMonitors=true, but the cluster does not serve monitoring.coreos.com/v1" \
      --set monitoring.podMonitors=true
    refuse "not both" --set tls.existingSecret.controller=x --set tls.existingSecret.datapath=y \
      --set tls.certManager.enabled=true
    # shellcheck disable=SC2086
    refuse 'unknown parameter "maxIOPS"' $secrets --set 'storageClasses[0].name=x' \
      --set 'storageClasses[0].parameters.maxIOPS=5'
    # shellcheck disable=SC2086
    refuse 'volumeAttributesClasses nbd-csi-silver: unknown parameter "iops"' \
      $secrets $vac_api --set volumeAttributesClasses.enabled=true \
      --set 'volumeAttributesClasses.classes[0].name=nbd-csi-silver' \
      --set 'volumeAttributesClasses.classes[0].parameters.iops=1'
    # shellcheck disable=SC2086
    refuse "must stay nbd.csi.io" $secrets --set driverName=other.csi.io
    # shellcheck disable=SC2086
    refuse "OnDelete or RollingUpdate" $secrets --set datapath.updateStrategy.type=Recreate
    # values.schema.json
    # shellcheck disable=SC2086
    refuse "controller.replicas: Invalid type. Expected: integer, given: string" $secrets --set controller.replicas=banana
    # shellcheck disable=SC2086
    refuse "datapath.overcommit: Must be greater than 0" $secrets --set datapath.overcommit=-1
    # shellcheck disable=SC2086
    refuse "datapath.overcommit: Does not match pattern" $secrets --set-string datapath.overcommit=-1.5
    # shellcheck disable=SC2086
    refuse "logLevel must be one of the following" $secrets --set logLevel=verbose
    # The datapath takes --free-reserve 0 to 90: the schema refuses the rest before a pod would
    # crash-loop on it.
    # shellcheck disable=SC2086
    refuse "datapath.freeReservePercent: Must be greater than or equal to 0" $secrets \
      --set datapath.freeReservePercent=-1
    # shellcheck disable=SC2086
    refuse "datapath.freeReservePercent: Must be less than or equal to 90" $secrets \
      --set datapath.freeReservePercent=95
    # shellcheck disable=SC2086
    refuse "datapath.freeReservePercent: Invalid type. Expected: number, given: string" $secrets \
      --set datapath.freeReservePercent=x
    # shellcheck disable=SC2086
    refuse "Additional property replica is not allowed" $secrets --set controller.replica=3
    # shellcheck disable=SC2086
    refuse "controller.healthMonitor.interval: Does not match pattern" $secrets \
      --set controller.healthMonitor.enabled=true --set controller.healthMonitor.interval=often
    # shellcheck disable=SC2086
    refuse "controller.runAsUser: Must be greater than or equal to 1" $secrets --set controller.runAsUser=0
    # Per-node certificates need a CA the user holds, and the controller checking nodes.
    refuse "tls.datapathHostPath: each node's certificate must chain to a CA whose key you hold" \
      --set tls.datapathHostPath=/etc/nbd-csi/node-tls --set tls.verifyDatapathServerName=false
    # shellcheck disable=SC2086
    refuse "tls.datapathHostPath: set tls.verifyDatapathServerName=false" $secrets \
      --set tls.datapathHostPath=/etc/nbd-csi/node-tls
    # shellcheck disable=SC2086
    refuse "tls.datapathHostPath: Does not match pattern" $secrets \
      --set tls.verifyDatapathServerName=false --set tls.datapathHostPath=etc/relative
    # Cluster mode: per-node certificates, an etcd certificate, an odd quorum, no etcd volume on
    # nbd-csi's own classes, no TLS secret for an etcd that is not external.
    # shellcheck disable=SC2086
    refuse "cluster.enabled: replicas are served over NBD with mutual TLS" \
      $secrets --set cluster.enabled=true
    # shellcheck disable=SC2086
    refuse "cluster.etcd.deploy: the etcd members need a server certificate" \
      --set tls.existingSecret.controller=x $cluster
    # shellcheck disable=SC2086
    refuse "cluster.etcd.deploy.replicas must be one of the following: 1, 3, 5" \
      --set tls.certManager.enabled=true $cluster --set cluster.etcd.deploy.replicas=2
    # shellcheck disable=SC2086
    refuse "storageClassName nbd-csi-qos is an nbd-csi class" \
      --set tls.certManager.enabled=true $cluster --set cluster.etcd.deploy.storage.storageClassName=nbd-csi-qos
    # shellcheck disable=SC2086
    refuse "the default StorageClass is nbd-csi, an nbd-csi class" \
      --set tls.certManager.enabled=true $cluster --set 'storageClasses[0].name=nbd-csi' \
      --set 'storageClasses[0].isDefaultClass=true'
    # shellcheck disable=SC2086
    refuse "cluster.etcd.external.tlsSecret is for an external etcd" \
      --set tls.certManager.enabled=true $cluster --set cluster.etcd.external.tlsSecret=x
    # shellcheck disable=SC2086
    refuse "choose cluster.etcd.insecure or cluster.etcd.external.tlsSecret" \
      --set tls.certManager.enabled=true $cluster --set 'cluster.etcd.external.endpoints[0]=e:2379' \
      --set cluster.etcd.external.tlsSecret=x --set cluster.etcd.insecure=true
    # shellcheck disable=SC2086
    refuse "cluster.etcd.external.endpoints.0: Does not match pattern" \
      --set tls.certManager.enabled=true $cluster --set 'cluster.etcd.external.endpoints[0]=https://e:2379/'
    # shellcheck disable=SC2086
    refuse "cluster.nbdPort 9820 is already the datapath's API or metrics port" \
      --set tls.certManager.enabled=true $cluster --set cluster.nbdPort=9820
    # shellcheck disable=SC2086
    refuse "cluster.prefix: Does not match pattern" \
      --set tls.certManager.enabled=true $cluster --set cluster.prefix=nbd-csi
    # What the cluster does not serve is refused when asked for explicitly.
    # shellcheck disable=SC2086
    refuse "does not serve snapshot.storage.k8s.io/v1" $secrets --set volumeSnapshotClass.create=true
    # Backups: a target is required and must be s3://; the bandwidth a quantity.
    # shellcheck disable=SC2086
    refuse "backup.enabled needs backup.target" $secrets --api-versions snapshot.storage.k8s.io/v1 \
      --set backup.enabled=true
    # shellcheck disable=SC2086
    refuse "backup.target: Does not match pattern" $secrets --set backup.enabled=true \
      --set backup.target=gs://bucket
    # shellcheck disable=SC2086
    refuse "backup.bandwidth: Does not match pattern" $secrets --set backup.enabled=true \
      --set backup.target=s3://b --set backup.bandwidth=fast
    # shellcheck disable=SC2086
    refuse "does not serve storage.k8s.io/v1beta1/VolumeAttributesClass" $secrets \
      --set volumeAttributesClasses.enabled=true
    # shellcheck disable=SC2086
    refuse "controller.apiServerAddress" $secrets --set controller.apiServerAddress=https://x
    # shellcheck disable=SC2086
    refuse 'datapath.kernelNbd.mode must be one of the following: "auto", "required", "off"' \
      $secrets --set datapath.kernelNbd.mode=maybe
    # The module arguments land in a shell script: nothing but NAME=VALUE.
    # shellcheck disable=SC2086
    refuse "datapath.kernelNbd.modprobeArgs.0: Does not match pattern" $secrets \
      --set 'datapath.kernelNbd.modprobeArgs[0]=x;reboot' ;;

  kernel-nbd)
    # The datapath's init container that loads nbd.ko, rendered for each mode, then run here
    # as the node would run it (when that cannot load a module into this host's kernel).
    python3 -c 'import yaml' 2>/dev/null || skip_or_fail "python3 has no yaml module (apt-get install python3-yaml)"
    script_of() {  # mode -> the init container's script (empty: no init container)
      # shellcheck disable=SC2086
      "$helm" template t "$chart" $secrets --set "datapath.kernelNbd.mode=$1" \
        --set 'datapath.kernelNbd.modprobeArgs[0]=nbds_max=32' | python3 -c '
import sys, yaml
for d in yaml.safe_load_all(sys.stdin):
    if d and d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-datapath"):
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []):
            assert c["name"] == "load-nbd" and c["command"][:2] == ["sh", "-c"], c
            assert c["securityContext"].get("privileged"), "modprobe needs privileges"
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/lib/modules", "/sys"} <= mounts, mounts
            print(c["command"][2])'
    }
    [ -z "$(script_of off)" ] || { echo "FAIL: mode off still renders an init container" >&2; exit 1; }
    echo "ok: mode off: no init container"
    # required also tells the datapath itself to refuse the fallback (nbd.ko unloaded later).
    for mode in off auto required; do
      # shellcheck disable=SC2086
      has=$("$helm" template t "$chart" $secrets --set "datapath.kernelNbd.mode=$mode" | python3 -c '
import sys, yaml
for d in yaml.safe_load_all(sys.stdin):
    if d and d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-datapath"):
        c = next(c for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "nbd-datapathd")
        print("--require-kernel-nbd" in c["args"])')
      want=False; [ $mode = required ] && want=True
      [ "$has" = $want ] || { echo "FAIL: mode $mode: --require-kernel-nbd in the datapath's args: $has, want $want" >&2; exit 1; }
    done
    echo "ok: only mode required passes --require-kernel-nbd to the datapath"
    for mode in auto required; do
      script_of $mode >"$tmp/$mode.sh"
      grep -q 'modprobe nbd nbds_max=32 2>&1' "$tmp/$mode.sh" || {
        cat "$tmp/$mode.sh" >&2; echo "FAIL: mode $mode: modprobe without the module arguments" >&2; exit 1; }
    done
    if [ -d /sys/module/nbd ]; then
      state="nbd is loaded"; want_auto=0; want_required=0; want_msg="kernel NBD: nbd is loaded"
    elif [ "$(id -u)" = 0 ] && ! modinfo nbd >/dev/null 2>&1; then
      state="no nbd module for kernel $(uname -r)"; want_auto=0; want_required=1
    else
      # Running it would load nbd.ko into this host's kernel (or fail for want of root).
      echo "ok: rendered for auto and required; not run here: nbd.ko is available but not loaded, or not root"
      exit 0
    fi
    for mode in auto required; do
      rc=0; sh "$tmp/$mode.sh" >"$tmp/$mode.out" 2>&1 || rc=$?
      want=$want_auto; [ $mode = required ] && want=$want_required
      [ $rc = "$want" ] || { cat "$tmp/$mode.out" >&2; echo "FAIL: mode $mode exited $rc, want $want ($state)" >&2; exit 1; }
      if [ -n "${want_msg:-}" ]; then
        grep -qF "$want_msg" "$tmp/$mode.out" || { cat "$tmp/$mode.out" >&2; exit 1; }
      elif [ $mode = auto ]; then
        grep -q "cannot load nbd.ko on kernel $(uname -r): modprobe: " "$tmp/auto.out" &&
          grep -q "WARNING: volumes on this node attach through the nbdfuse fallback" "$tmp/auto.out" || {
          cat "$tmp/auto.out" >&2; echo "FAIL: mode auto does not say why and what follows" >&2; exit 1; }
      else
        grep -q "datapath.kernelNbd.mode is required: the datapath does not start" "$tmp/required.out" || {
          cat "$tmp/required.out" >&2; echo "FAIL: mode required does not say why it stops" >&2; exit 1; }
      fi
      echo "ok: mode $mode on this host ($state): exit $rc, $(tail -1 "$tmp/$mode.out" | cut -c1-100)"
    done ;;

  drift)
    "$src/scripts/render-manifests.sh" --check
    echo "ok: manifests/nbd-csi.yaml matches the chart" ;;

  check)
    # Every value set's rendering; the defaults carry generated certificates (verified) and get
    # the self-test; the VolumeAttributesClass one is where the examples are checked, since
    # vac-modify.yaml needs those classes. Then the committed plain manifests, with the secrets
    # manifests/gen-tls-secrets.sh makes for them.
    while IFS='|' read -r name args; do
      extra=()
      case $name in
        defaults) extra=(--expect-secrets --self-test) ;;
        vac) extra=(--examples "$src/examples") ;;
        backup) extra=(--examples "$src/examples" --examples "$src/examples/backup") ;;
        cluster-etcd-3|cluster-etcd-insecure) extra=(--self-test) ;;
      esac
      # shellcheck disable=SC2086
      "$helm" template nbd-csi "$chart" -n nbd-csi $args >"$tmp/$name.yaml"
      python3 "$src/test/deploy/check_manifests.py" --bin-dir "$bin" --src "$src" \
        "${extra[@]}" "$tmp/$name.yaml" || { echo "FAIL: check_manifests ($name)" >&2; exit 1; }
    done < <(value_sets)
    "$src/manifests/gen-tls-secrets.sh" >"$tmp/secrets.yaml"
    python3 "$src/test/deploy/check_manifests.py" --bin-dir "$bin" --src "$src" \
      --expect-secrets "$src/manifests/nbd-csi.yaml" "$tmp/secrets.yaml" ;;

  version)
    # Chart.yaml's appVersion is the project version (the image tag defaults to it).
    want=${NBDCSI_PROJECT_VERSION:-$(sed -n 's/^project(nbd-csi VERSION \([0-9.]*\).*/\1/p' "$src/CMakeLists.txt")}
    got=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$chart/Chart.yaml")
    [ -n "$want" ] || { echo "FAIL: no project version (CMakeLists.txt)" >&2; exit 1; }
    [ "$want" = "$got" ] || {
      echo "FAIL: Chart.yaml appVersion $got, project version $want" >&2; exit 1; }
    echo "ok: appVersion $got" ;;

  *) echo "usage: $0 lint|template|drift|check|version|kernel-nbd" >&2; exit 2 ;;
esac
