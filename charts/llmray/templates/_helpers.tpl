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
# the Ray auth token Secret: create only. The operator derives each token from its own key, so it
# never reads a Secret back, and it references users' Secrets in pods without reading them (the
# kubelet reads them, and reports a missing one on the pod).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# the Ray cluster's NetworkPolicy (created; read on a name clash; patched when the spec changes)
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
# Kubernetes Events about the resources
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.kueue.enabled }}
# Kueue: the Workload of each queue-labelled training job (watched for admission and eviction, read
# back on a name clash, deleted when the job's pods change while queued) and its status (the quota
# given back after an eviction, Finished when the job ends)
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "watch", "get", "create", "patch", "delete"]
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads/status"]
  verbs: ["patch"]
# whether the namespace has a LocalQueue named "default" (Kueue's LocalQueueDefaulting)
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["localqueues"]
  verbs: ["get"]
{{- end }}
{{- end -}}


{{- define "llmray.authKeySecretName" -}}
{{- printf "%s-auth-key" (include "llmray.fullname" .) -}}
{{- end -}}
