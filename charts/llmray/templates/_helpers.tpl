{{/* Names and labels shared by every template. */}}
{{- define "llmray.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmray.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llmray.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmray.selectorLabels" -}}
app.kubernetes.io/name: llmray-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmray.labels" -}}
{{ include "llmray.selectorLabels" . }}
app.kubernetes.io/part-of: llmray
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The operator's permissions: exactly what it calls (see docs/operator.md, "RBAC"). */}}
{{- define "llmray.rules" -}}
# watch the two resources (Kopf lists and watches; the operator never writes their spec)
- apiGroups: ["llmray.io"]
  resources: ["llmtrainingjobs", "llmdeployments"]
  verbs: ["list", "watch"]
# write their status
- apiGroups: ["llmray.io"]
  resources: ["llmtrainingjobs/status", "llmdeployments/status"]
  verbs: ["patch"]
# Ray head and worker pods: created, replaced and removed by name
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "get", "create", "delete"]
# head and serve Services (patched in place when spec.service changes)
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "get", "create", "patch"]
# the Ray auth token Secret (created), and the user's Secrets that pods reference (checked to exist)
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "watch", "get", "create"]
# Kubernetes Events about the resources
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}
