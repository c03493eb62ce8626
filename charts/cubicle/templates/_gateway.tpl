{{/*
The gateway's names and labels. Its pods carry their own app.kubernetes.io/name, so the
operator's selectors (Deployment, PDB, NetworkPolicy) never match them.
*/}}
{{- define "cubicle.gateway.fullname" -}}
{{- printf "%s-gateway" (include "cubicle.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cubicle.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-gateway" (include "cubicle.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cubicle.gateway.labels" -}}
helm.sh/chart: {{ include "cubicle.chart" . }}
{{ include "cubicle.gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: cubicle
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The master key's Secret (created by the operator, read by the gateway). */}}
{{- define "cubicle.gateway.keySecret" -}}
{{- printf "%s-session-key" (include "cubicle.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The base domain of gateway.publicUrl. */}}
{{- define "cubicle.gateway.domain" -}}
{{- $u := required "gateway.publicUrl is required when gateway.enabled (e.g. https://cubicle.example.com)" .Values.gateway.publicUrl }}
{{- $rest := regexReplaceAll "^https?://" $u "" }}
{{- regexReplaceAll "(:[0-9]+)?/?$" $rest "" }}
{{- end }}

{{/*
Environment of the operator container when the gateway is on: session credentials (VNC_PW
Secrets) and status.url. Included by deployment.yaml.
*/}}
{{- define "cubicle.gateway.operatorEnv" -}}
{{- if .Values.gateway.enabled }}
- name: CUBICLE_SESSION_CREDENTIALS
  value: "true"
- name: CUBICLE_KEY_SECRET
  value: {{ include "cubicle.gateway.keySecret" . | quote }}
- name: CUBICLE_PUBLIC_URL
  value: {{ .Values.gateway.publicUrl | quote }}
{{- end }}
{{- end }}

{{/* Namespaces whose session pods the gateway's NetworkPolicy guards. */}}
{{- define "cubicle.gateway.sessionNamespaces" -}}
{{- if .Values.gateway.networkPolicy.namespaces }}
{{- toJson .Values.gateway.networkPolicy.namespaces }}
{{- else if eq .Values.rbac.scope "namespaces" }}
{{- toJson .Values.rbac.namespaces }}
{{- else }}
{{- toJson (list) }}
{{- end }}
{{- end }}
