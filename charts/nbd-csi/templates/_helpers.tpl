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

{{/* Refuses value combinations that would deploy something broken. */}}
{{- define "nbd-csi.validate" -}}
{{- if ne .Values.driverName "nbd.csi.io" -}}
{{- fail "driverName is compiled into the binaries and must stay nbd.csi.io" -}}
{{- end -}}
{{- $c := .Values.tls.existingSecret.controller -}}
{{- $d := .Values.tls.existingSecret.datapath -}}
{{- if or (and $c (not $d)) (and $d (not $c)) -}}
{{- fail "tls.existingSecret: set both controller and datapath, or neither" -}}
{{- end -}}
{{- if and $c .Values.tls.certManager.enabled -}}
{{- fail "tls: choose tls.existingSecret or tls.certManager.enabled, not both" -}}
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
