{{/* Full name of the release's objects. */}}
{{- define "distkv.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every chart object. */}}
{{- define "distkv.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: distkv
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: distkv
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels selecting the operator pods. */}}
{{- define "distkv.operatorSelector" -}}
app.kubernetes.io/name: distkv-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "distkv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "distkv.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- /* Never the namespace's "default" account: the operator's cluster role would go to
       every pod that runs as it. */ -}}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's leader-election Lease: its --lease-name and the only Lease its Role
     may read and update. */}}
{{- define "distkv.leaseName" -}}
{{- printf "%s-operator" (include "distkv.fullname" .) -}}
{{- end -}}

{{- define "distkv.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Namespaces that get the NetworkPolicies: those listed, else the one watched (where
     the KvClusters and their pods are), else the release namespace. */}}
{{- define "distkv.policyNamespaces" -}}
{{- if .Values.networkPolicy.namespaces -}}
{{- toJson .Values.networkPolicy.namespaces -}}
{{- else if .Values.operator.watchNamespace -}}
{{- toJson (list .Values.operator.watchNamespace) -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}
