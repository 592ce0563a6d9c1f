{{/* Names and labels shared by every template. */}}

{{- define "chatcli.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chatcli.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chatcli.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatcli.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chatcli.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "chatcli.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "chatcli.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatcli.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chatcli.configMapName" -}}
{{- default (include "chatcli.fullname" .) .Values.config.existingConfigMap }}
{{- end }}

{{- define "chatcli.secretName" -}}
{{- default (include "chatcli.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "chatcli.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* A drop-in's ConfigMap key: ConfigMap keys cannot hold "/", so conf.d/<name> is mapped back by items. */}}
{{- define "chatcli.dropInKey" -}}
{{- printf "conf.d_%s" . }}
{{- end }}

{{/*
The watcher's drop-in (conf.d/00-watcher.toml): [watcher] and its [[watcher.targets]], from the
watcher values; a target without a namespace watches the release's.
*/}}
{{- define "chatcli.watcherToml" -}}
# Rendered from the chart's watcher values.
[watcher]
interval = {{ .Values.watcher.interval | quote }}
window = {{ .Values.watcher.window | quote }}
max_log_lines = {{ .Values.watcher.maxLogLines | int }}
max_context_chars = {{ .Values.watcher.maxContextChars | int }}
inject_openai = {{ .Values.watcher.injectOpenai }}
{{- range .Values.watcher.targets }}

[[watcher.targets]]
deployment = {{ .deployment | quote }}
kind = {{ .kind | default "Deployment" | quote }}
namespace = {{ .namespace | default $.Release.Namespace | quote }}
{{- with .metricsPort }}
metrics_port = {{ . | int }}
{{- end }}
{{- with .metricsPath }}
metrics_path = {{ . | quote }}
{{- end }}
{{- with .metricsFilter }}
metrics_filter = [{{ range $i, $g := . }}{{ if $i }}, {{ end }}{{ $g | quote }}{{ end }}]
{{- end }}
{{- end }}
{{- end }}

{{/*
The watcher's namespaced rules; the argument is the set (a dict) of the targets' kinds, so only
the workload resources watched are granted.
*/}}
{{- define "chatcli.watcherRules" -}}
- apiGroups: [""]
  resources: ["pods", "events"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
{{- $apps := list }}
{{- if hasKey . "Deployment" }}{{ $apps = append $apps "deployments" }}{{ end }}
{{- if hasKey . "StatefulSet" }}{{ $apps = append $apps "statefulsets" }}{{ end }}
{{- if hasKey . "DaemonSet" }}{{ $apps = append $apps "daemonsets" }}{{ end }}
{{- if $apps }}
- apiGroups: ["apps"]
  resources: [{{ range $i, $r := $apps }}{{ if $i }}, {{ end }}{{ $r | quote }}{{ end }}]
  verbs: ["get", "list", "watch"]
{{- end }}
{{- $batch := list }}
{{- if hasKey . "Job" }}{{ $batch = append $batch "jobs" }}{{ end }}
{{- if hasKey . "CronJob" }}{{ $batch = append $batch "cronjobs" }}{{ end }}
{{- if $batch }}
- apiGroups: ["batch"]
  resources: [{{ range $i, $r := $batch }}{{ if $i }}, {{ end }}{{ $r | quote }}{{ end }}]
  verbs: ["get", "list", "watch"]
{{- end }}
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* Settings that must hold together; each failure says what to change. */}}
{{- define "chatcli.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with tls.crt and tls.key)" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled needs tls.enabled: client certificates are only asked for over TLS" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.clientCA.existingSecret) }}
{{- fail "tls.clientCA.enabled needs tls.clientCA.existingSecret" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.metrics.enabled) }}
{{- fail "tls.enabled needs metrics.enabled: over TLS the probes use /healthz and /readyz on the metrics port" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if and .Values.watcher.enabled (not .Values.watcher.targets) }}
{{- fail "watcher.enabled needs at least one entry in watcher.targets" }}
{{- end }}
{{- if and .Values.watcher.enabled (not .Values.serviceAccount.automountServiceAccountToken) }}
{{- fail "watcher.enabled needs serviceAccount.automountServiceAccountToken: the watcher reads the API server with that token" }}
{{- end }}
{{- end }}

{{/* Text indented for a YAML block scalar, without trailing newline or whitespace-only lines (yamllint). */}}
{{- define "chatcli.block4" -}}
{{- regexReplaceAll "(?m)^[ \t]+$" (trimSuffix "\n" . | nindent 4) "" }}
{{- end }}
