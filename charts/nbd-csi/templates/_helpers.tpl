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
{{- $known := list "maxIops" "maxReadIops" "maxWriteIops" "maxBps" "maxReadBps" "maxWriteBps" "iopsPerGiB" "bpsPerGiB" "burstMs" -}}
{{- range .Values.storageClasses -}}
{{- $sc := .name -}}
{{- range $k, $v := .parameters -}}
{{- if not (or (has $k $known) (hasPrefix "csi.storage.k8s.io/" $k)) -}}
{{- fail (printf "storageClasses %s: unknown parameter %q; known: %s" $sc $k (join ", " $known)) -}}
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
