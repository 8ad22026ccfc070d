{{/* Names. Pod names (<fullname>-<ordinal>) and Service names stay within DNS label limits. */}}
{{- define "vesper.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vesper.headless" -}}{{ include "vesper.fullname" . }}-headless{{- end -}}

{{- define "vesper.clusterName" -}}{{ default .Release.Name .Values.clusterName }}{{- end -}}

{{/* The stable DNS name of pod ORDINAL (argument: list ROOT ORDINAL). */}}
{{- define "vesper.podHost" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%v.%s.%s.svc.%s" (include "vesper.fullname" $root) (index . 1) (include "vesper.headless" $root) $root.Release.Namespace $root.Values.clusterDomain -}}
{{- end -}}

{{/* The join list: the cluster addresses of the first join.seeds pods, whatever replicas is. */}}
{{- define "vesper.joinList" -}}
{{- $root := . -}}
{{- $seeds := list -}}
{{- range $i := until (int .Values.join.seeds) -}}
{{- $seeds = append $seeds (printf "%s:%d" (include "vesper.podHost" (list $root $i)) (int $root.Values.ports.cluster)) -}}
{{- end -}}
{{- join "," $seeds -}}
{{- end -}}

{{- define "vesper.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vesper.labels" -}}
{{ include "vesper.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "vesper.superpeerLabels" -}}
{{ include "vesper.selectorLabels" . }}
app.kubernetes.io/component: superpeer
{{- end -}}

{{/* Pods that may use the admin port: the hook Jobs and the test. */}}
{{- define "vesper.adminClientLabel" -}}{{ include "vesper.fullname" . }}-admin-client{{- end -}}

{{- define "vesper.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "vesper.tlsSecret" -}}
{{- if eq .Values.tls.mode "certManager" -}}{{ include "vesper.fullname" . }}-superpeer-tls{{- else -}}{{ .Values.tls.existingSecret }}{{- end -}}
{{- end -}}

{{- define "vesper.operatorSecret" -}}
{{- if eq .Values.tls.mode "certManager" -}}{{ include "vesper.fullname" . }}-operator-tls{{- else -}}{{ .Values.tls.operatorSecret }}{{- end -}}
{{- end -}}

{{- define "vesper.standbys" -}}
{{- if kindIs "invalid" .Values.placement.standbys -}}{{ sub (int .Values.replicas) (int .Values.placement.voters) }}{{- else -}}{{ int .Values.placement.standbys }}{{- end -}}
{{- end -}}

{{/*
TOML from a map: scalars and arrays first as `key = value`, then each nested map as a [table]. Helm reads
numbers in values as floats; whole ones are written as integers, which the super peer's u64 settings need.
*/}}
{{- define "vesper.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}{{ toJson $v }}
{{- else if kindIs "bool" $v -}}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- if eq (float64 $v) (floor $v) -}}{{ int64 $v }}{{- else -}}{{ $v }}{{- end -}}
{{- else if kindIs "slice" $v -}}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "vesper.tomlValue" $e }}{{ end }}]
{{- else -}}{{ fail (printf "config: %v cannot be written as TOML" $v) }}
{{- end -}}
{{- end -}}

{{- define "vesper.tomlTable" -}}
{{- $prefix := index . 0 -}}
{{- $table := index . 1 -}}
{{- range $key := keys $table | sortAlpha -}}
{{- $v := index $table $key -}}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v)) }}
{{ $key }} = {{ include "vesper.tomlValue" $v }}
{{- end -}}
{{- end -}}
{{- range $key := keys $table | sortAlpha -}}
{{- $v := index $table $key -}}
{{- if kindIs "map" $v -}}
{{- $name := ternary $key (printf "%s.%s" $prefix $key) (eq $prefix "") }}

[{{ $name }}]
{{- include "vesper.tomlTable" (list $name $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The super peer's configuration: the values' config, with the keys the chart owns laid over it. */}}
{{- define "vesper.superpeerToml" -}}
{{- $owned := dict
  "data_dir" "/var/lib/vesper/data"
  "leaf_listen" (printf "0.0.0.0:%d" (int .Values.ports.leaf))
  "cluster_listen" (printf "0.0.0.0:%d" (int .Values.ports.cluster))
  "admin_listen" (printf "0.0.0.0:%d" (int .Values.ports.admin))
  "ops_listen" (printf "0.0.0.0:%d" (int .Values.ports.ops))
  "cluster_name" (include "vesper.clusterName" .)
  "start" (dict "join" (include "vesper.joinList" .))
  "tls" (dict "ca_cert" "/etc/vesper/tls/ca.crt" "cert" "/etc/vesper/tls/tls.crt" "key" "/etc/vesper/tls/tls.key")
-}}
{{- $config := mustMergeOverwrite (deepCopy .Values.config) $owned -}}
# Rendered by the Vesper chart from .Values.config; keys as in docs/CONFIG.md. advertise_host comes from the
# environment (VESPER_ADVERTISE_HOST, the pod's stable DNS name).
{{- include "vesper.tomlTable" (list "" $config) }}
{{ end -}}

{{/* The environment of every container that runs vesperctl against this release's admin port. */}}
{{- define "vesper.operatorEnv" -}}
- name: VESPER_CA
  value: /etc/vesper/operator/ca.crt
- name: VESPER_CERT
  value: /etc/vesper/operator/tls.crt
- name: VESPER_KEY
  value: /etc/vesper/operator/tls.key
{{- end -}}
