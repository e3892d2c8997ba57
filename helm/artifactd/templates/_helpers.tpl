{{/* The chart name, or nameOverride. */}}
{{- define "artifactd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: fullnameOverride, else <release>-<chart> (or the release name
when it already contains the chart name). */}}
{{- define "artifactd.fullname" -}}
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

{{- define "artifactd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "artifactd.labels" -}}
helm.sh/chart: {{ include "artifactd.chart" . }}
{{ include "artifactd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the pods. */}}
{{- define "artifactd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "artifactd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "artifactd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "artifactd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the pods read credentials from. */}}
{{- define "artifactd.secretName" -}}
{{- default (include "artifactd.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* The Secret the migration hook reads: created by the hook itself (before the Job) unless
an existing Secret is named, since the chart's own Secret does not exist yet at
pre-install. */}}
{{- define "artifactd.migrationSecretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- printf "%s-migrate" (include "artifactd.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "artifactd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Whether a JWT public key file is mounted. */}}
{{- define "artifactd.jwtPublicKey" -}}
{{- if or .Values.secrets.jwtPublicKey (and .Values.secrets.existingSecret .Values.secrets.existingSecretHasJwtPublicKey) }}true{{ end }}
{{- end }}

{{/* Credentials as environment variables from the Secret (the optional ones may be absent). */}}
{{- define "artifactd.secretEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "artifactd.secretName" . }}
      key: DATABASE_URL
{{- range list "REDIS_URL" "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" "ARTIFACTD_JWT_SECRET" }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "artifactd.secretName" $ }}
      key: {{ . }}
      optional: true
{{- end }}
{{- end }}
