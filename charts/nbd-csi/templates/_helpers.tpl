{{/* Names: everything is prefixed with the release's full name, cut to 63 characters less the
longest suffix we append ("-controller-tls" is 15). */}}
{{- define "nbd-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nbd-csi.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "controller"). */}}
{{- define "nbd-csi.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "nbd-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "nbd-csi.controllerService" -}}
{{- printf "%s-controller" (include "nbd-csi.fullname" .) -}}
{{- end -}}

{{/* The TLS secret names, wherever the certificates come from. */}}
{{- define "nbd-csi.controllerTlsSecret" -}}
{{- default (printf "%s-controller-tls" (include "nbd-csi.fullname" .)) .Values.tls.existingSecret.controller -}}
{{- end -}}
{{- define "nbd-csi.datapathTlsSecret" -}}
{{- default (printf "%s-datapath-tls" (include "nbd-csi.fullname" .)) .Values.tls.existingSecret.datapath -}}
{{- end -}}

{{/* The cluster's etcd (values.yaml, cluster). The chart deploys it when cluster mode is on and no
external endpoint is given; each helper prints nothing when it does not apply. */}}
{{- define "nbd-csi.etcdDeployed" -}}
{{- if and .Values.cluster.enabled (not .Values.cluster.etcd.external.endpoints) -}}true{{- end -}}
{{- end -}}
{{- define "nbd-csi.etcdName" -}}
{{- printf "%s-etcd" (include "nbd-csi.fullname" .) -}}
{{- end -}}
{{- define "nbd-csi.etcdTlsSecret" -}}
{{- default (printf "%s-etcd-tls" (include "nbd-csi.fullname" .)) .Values.cluster.etcd.deploy.tls.existingSecret -}}
{{- end -}}
{{- define "nbd-csi.etcdScheme" -}}
{{- if .Values.cluster.etcd.insecure -}}http{{- else -}}https{{- end -}}
{{- end -}}
{{/* The DNS names of the deployed members, one per line: what the peers and the datapaths dial,
and what the members' certificate must name. */}}
{{- define "nbd-csi.etcdMemberHosts" -}}
{{- $name := include "nbd-csi.etcdName" . -}}
{{- range $i := until (int .Values.cluster.etcd.deploy.replicas) }}
{{ printf "%s-%d.%s.%s.svc" $name $i $name $.Release.Namespace }}
{{- end -}}
{{- end -}}
{{/* --cluster-etcd: the external endpoints, or every deployed member's client address. */}}
{{- define "nbd-csi.etcdEndpoints" -}}
{{- if .Values.cluster.etcd.external.endpoints -}}
{{- join "," .Values.cluster.etcd.external.endpoints -}}
{{- else -}}
{{- $eps := list -}}
{{- range (include "nbd-csi.etcdMemberHosts" . | trim | splitList "\n") -}}
{{- $eps = append $eps (printf "%s:%d" . (int $.Values.cluster.etcd.deploy.clientPort)) -}}
{{- end -}}
{{- join "," $eps -}}
{{- end -}}
{{- end -}}

{{/* What the cluster serves decides a few objects and flags, so that one chart installs on every
supported Kubernetes (1.20 and later) instead of failing on the older ones. helm install and
upgrade ask the API server; helm template assumes its own default version unless given
--kube-version and --api-versions. Each helper prints "true" or nothing. */}}

{{/* CSIStorageCapacity storage.k8s.io/v1 (Kubernetes 1.24): the provisioner publishes capacity
per node and the scheduler uses it. Before that the sidecar's capacity mode has nothing to
write to. */}}
{{- define "nbd-csi.capacity" -}}
{{- if semverCompare ">=1.24.0-0" .Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- end -}}

{{/* The VolumeSnapshotClass: volumeSnapshotClass.create is auto, true or false. */}}
{{- define "nbd-csi.snapshotClass" -}}
{{- $served := .Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1" -}}
{{- $create := .Values.volumeSnapshotClass.create -}}
{{- if eq (toString $create) "true" -}}
{{- if not $served -}}
{{- fail "volumeSnapshotClass.create=true, but the cluster does not serve snapshot.storage.k8s.io/v1: install the snapshot CRDs and snapshot-controller (kubernetes-csi/external-snapshotter) first, or set volumeSnapshotClass.create=auto or false (helm template: pass --api-versions snapshot.storage.k8s.io/v1)" -}}
{{- end -}}
true
{{- else if and (eq (toString $create) "auto") $served -}}
true
{{- end -}}
{{- end -}}

{{/* The Prometheus Operator objects: (dict "ctx" $ "create" <auto|true|false> "what" "monitoring.podMonitors").
Prints "true" when they are to be rendered; fails on true when the cluster lacks the CRDs. */}}
{{- define "nbd-csi.monitoringObject" -}}
{{- $served := .ctx.Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}
{{- if eq (toString .create) "true" -}}
{{- if not $served -}}
{{- fail (printf "%s=true, but the cluster does not serve monitoring.coreos.com/v1: install the Prometheus Operator's CRDs first, or set %s=auto or false (helm template: pass --api-versions monitoring.coreos.com/v1)" .what .what) -}}
{{- end -}}
true
{{- else if and (eq (toString .create) "auto") $served -}}
true
{{- end -}}
{{- end -}}

{{- define "nbd-csi.pdbApiVersion" -}}
{{- if semverCompare ">=1.21.0-0" .Capabilities.KubeVersion.Version -}}policy/v1{{- else -}}policy/v1beta1{{- end -}}
{{- end -}}

{{/* The API server's address for the controller's sidecars when the kubernetes Service cannot
be used (controller.apiServerAddress): client-go's in-cluster configuration reads these two
variables, and a container's own env wins over the ones the kubelet injects. */}}
{{- define "nbd-csi.apiServerEnv" -}}
{{- with .Values.controller.apiServerAddress -}}
{{- $hp := regexSplit ":" . -1 -}}
- name: KUBERNETES_SERVICE_HOST
  value: {{ index $hp 0 | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ index $hp 1 | quote }}
{{- end -}}
{{- end -}}

{{/* The controller pod's containers: none needs a privilege, a writable root or new capabilities. */}}
{{- define "nbd-csi.restricted" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: [ALL]
{{- end -}}

{{/* Refuses value combinations that would deploy something broken. */}}
{{- define "nbd-csi.validate" -}}
{{- if ne .Values.driverName "nbd.csi.io" -}}
{{- fail "driverName is compiled into the binaries and must stay nbd.csi.io" -}}
{{- end -}}
{{- $c := .Values.tls.existingSecret.controller -}}
{{- $d := .Values.tls.existingSecret.datapath -}}
{{- $perNode := .Values.tls.datapathHostPath -}}
{{- if or (and $c (not $d) (not $perNode)) (and $d (not $c)) -}}
{{- fail "tls.existingSecret: set both controller and datapath, or neither" -}}
{{- end -}}
{{- if $perNode -}}
{{- if not (or $c .Values.tls.certManager.enabled) -}}
{{- fail "tls.datapathHostPath: each node's certificate must chain to a CA whose key you hold: set tls.existingSecret.controller (or tls.certManager.enabled); the CA Helm generates keeps no key to sign them with" -}}
{{- end -}}
{{- if .Values.tls.verifyDatapathServerName -}}
{{- fail "tls.datapathHostPath: set tls.verifyDatapathServerName=false, so that the controller checks each datapath's certificate against its node instead of one shared name" -}}
{{- end -}}
{{- end -}}
{{- if and $c .Values.tls.certManager.enabled -}}
{{- fail "tls: choose tls.existingSecret or tls.certManager.enabled, not both" -}}
{{- end -}}
{{- if .Values.volumeAttributesClasses.enabled -}}
{{- $vac := printf "%s/VolumeAttributesClass" .Values.volumeAttributesClasses.apiVersion -}}
{{- if not (.Capabilities.APIVersions.Has $vac) -}}
{{- fail (printf "volumeAttributesClasses.enabled=true, but the cluster does not serve %s (Kubernetes %s): enable the VolumeAttributesClass feature gate and that API version, set volumeAttributesClasses.apiVersion to the one served, or leave volumeAttributesClasses.enabled=false (helm template: pass --api-versions %s)" $vac .Capabilities.KubeVersion.Version $vac) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.controller.apiServerAddress (not (regexMatch "^[^:/]+:[0-9]+$" .Values.controller.apiServerAddress)) -}}
{{- fail (printf "controller.apiServerAddress %q must be HOST:PORT" .Values.controller.apiServerAddress) -}}
{{- end -}}
{{- if not (has .Values.datapath.updateStrategy.type (list "OnDelete" "RollingUpdate")) -}}
{{- fail "datapath.updateStrategy.type must be OnDelete or RollingUpdate" -}}
{{- end -}}
{{- with .Values.cluster -}}
{{- if .enabled -}}
{{- if not $.Values.tls.datapathHostPath -}}
{{- fail "cluster.enabled: replicas are served over NBD with mutual TLS and a target checks that each replica's certificate names its node (URI SAN spiffe://nbd.csi.io/node/<node name>); the shared datapath certificate names none: set tls.datapathHostPath to each node's own certificate directory" -}}
{{- end -}}
{{- if has (int .nbdPort) (list (int $.Values.datapath.apiPort) (int $.Values.datapath.metrics.port)) -}}
{{- fail (printf "cluster.nbdPort %d is already the datapath's API or metrics port" (int .nbdPort)) -}}
{{- end -}}
{{- if and .etcd.insecure .etcd.external.tlsSecret -}}
{{- fail "cluster.etcd: choose cluster.etcd.insecure or cluster.etcd.external.tlsSecret, not both" -}}
{{- end -}}
{{- if and .etcd.external.tlsSecret (not .etcd.external.endpoints) -}}
{{- fail "cluster.etcd.external.tlsSecret is for an external etcd: set cluster.etcd.external.endpoints too (or leave it empty to deploy etcd)" -}}
{{- end -}}
{{- if include "nbd-csi.etcdDeployed" $ -}}
{{- $d := .etcd.deploy -}}
{{- $r := int $d.replicas -}}
{{- if or (lt $r 1) (and (gt $r 1) (eq (mod $r 2) 0)) -}}
{{- fail (printf "cluster.etcd.deploy.replicas %d: etcd needs a majority of its members, so an even count tolerates no more failures than one less: use 1, 3 or 5" $r) -}}
{{- end -}}
{{- if and (not .etcd.insecure) (not $d.tls.existingSecret) (not $.Values.tls.certManager.enabled) -}}
{{- fail "cluster.etcd.deploy: the etcd members need a server certificate from the node certificates' CA: set cluster.etcd.deploy.tls.existingSecret (tls.crt, tls.key, ca.crt), or tls.certManager.enabled to have it issued (cluster.etcd.insecure for a plaintext test cluster)" -}}
{{- end -}}
{{- $classes := list -}}
{{- range $.Values.storageClasses -}}
{{- $classes = append $classes .name -}}
{{- if and .isDefaultClass (not $d.storage.storageClassName) -}}
{{- fail (printf "cluster.etcd.deploy.storage.storageClassName is empty and the default StorageClass is %s, an nbd-csi class: its volumes need the datapaths, which need this etcd to start; name another StorageClass" .name) -}}
{{- end -}}
{{- end -}}
{{- if has $d.storage.storageClassName $classes -}}
{{- fail (printf "cluster.etcd.deploy.storage.storageClassName %s is an nbd-csi class: its volumes need the datapaths, which need this etcd to start; use another StorageClass" $d.storage.storageClassName) -}}
{{- end -}}
{{- if has (int $d.metricsPort) (list (int $d.clientPort) (int $d.peerPort)) -}}
{{- fail "cluster.etcd.deploy: clientPort, peerPort and metricsPort must differ" -}}
{{- end -}}
{{- if eq (int $d.clientPort) (int $d.peerPort) -}}
{{- fail "cluster.etcd.deploy: clientPort, peerPort and metricsPort must differ" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $known := list "maxIops" "maxReadIops" "maxWriteIops" "maxBps" "maxReadBps" "maxWriteBps" "iopsPerGiB" "bpsPerGiB" "burstMs" -}}
{{- $clusterOn := .Values.cluster.enabled -}}
{{- range .Values.storageClasses -}}
{{- $sc := .name -}}
{{- $rendered := or (not .requiresCluster) $clusterOn -}}
{{- range $k, $v := .parameters -}}
{{- if eq $k "replicas" -}}
{{- if not (has (toString $v) (list "1" "2" "3")) -}}
{{- fail (printf "storageClasses %s: replicas %q must be 1, 2 or 3" $sc (toString $v)) -}}
{{- end -}}
{{- if and $rendered (ne (toString $v) "1") (not $clusterOn) -}}
{{- fail (printf "storageClasses %s: replicas %s needs cluster.enabled=true (the controller keeps replicated volumes in etcd)" $sc (toString $v)) -}}
{{- end -}}
{{- else if not (or (has $k $known) (hasPrefix "csi.storage.k8s.io/" $k)) -}}
{{- fail (printf "storageClasses %s: unknown parameter %q; known: %s, replicas" $sc $k (join ", " $known)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range .Values.volumeAttributesClasses.classes -}}
{{- $vc := .name -}}
{{- range $k, $v := .parameters -}}
{{- if not (has $k $known) -}}
{{- fail (printf "volumeAttributesClasses %s: unknown parameter %q; known: %s" $vc $k (join ", " $known)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* The backup Secret is mounted into the datapath pods (for scheduled backups) when backups are
  enabled and the Secret is in the release's namespace: a pod cannot mount another namespace's. */}}
{{- define "nbd-csi.backupSecretMounted" -}}
{{- if and .Values.backup.enabled (or (not .Values.backup.secretNamespace) (eq .Values.backup.secretNamespace .Release.Namespace)) -}}
true
{{- end -}}
{{- end -}}
