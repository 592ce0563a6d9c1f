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
{{- end }}

{{/* Text indented for a YAML block scalar, without trailing newline or whitespace-only lines (yamllint). */}}
{{- define "chatcli.block4" -}}
{{- regexReplaceAll "(?m)^[ \t]+$" (trimSuffix "\n" . | nindent 4) "" }}
{{- end }}
