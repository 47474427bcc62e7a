{{/* Chart name, truncated for label values. */}}
{{- define "keypool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's resources. */}}
{{- define "keypool.fullname" -}}
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

{{- define "keypool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keypool.labels" -}}
helm.sh/chart: {{ include "keypool.chart" . }}
{{ include "keypool.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "keypool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keypool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keypool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keypool.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the pods read: existingSecret or the chart's own. */}}
{{- define "keypool.secretName" -}}
{{- default (include "keypool.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "keypool.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
keypool.validate fails the render on combinations that cannot work. It is
included by the Deployment, so `helm install` and `helm template` stop
with the message.
*/}}
{{- define "keypool.validate" -}}
{{- $sqlite := eq .Values.database.type "sqlite" }}
{{- if and $sqlite (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "keypool: replicaCount=%d needs database.type=postgres: SQLite lives on one pod's volume and cannot be shared by several replicas. Set database.type=postgres and database.url (or key database-url of existingSecret), or replicaCount=1." (int .Values.replicaCount)) }}
{{- end }}
{{- if and $sqlite .Values.autoscaling.enabled }}
{{- fail "keypool: autoscaling.enabled needs database.type=postgres: SQLite lives on one pod's volume and cannot be shared by several replicas. Set database.type=postgres and database.url (or key database-url of existingSecret), or disable autoscaling." }}
{{- end }}
{{- if and $sqlite .Values.database.url }}
{{- fail "keypool: database.url is set but database.type is sqlite; set database.type=postgres to use it." }}
{{- end }}
{{- if and (not $sqlite) (not .Values.existingSecret) }}
{{- if not .Values.database.url }}
{{- fail "keypool: database.type=postgres needs database.url (postgres://…), or existingSecret with the key database-url." }}
{{- end }}
{{- if not (and .Values.secrets.adminToken .Values.secrets.encryptionKey) }}
{{- fail "keypool: database.type=postgres needs secrets.adminToken and secrets.encryptionKey (or existingSecret): every replica must share them, and a generated one would stay on a single pod's scratch volume." }}
{{- end }}
{{- if and .Values.secrets.googleClientId (not .Values.secrets.oidcStateSecret) }}
{{- fail "keypool: secrets.googleClientId with database.type=postgres needs secrets.oidcStateSecret (32 characters or more, e.g. openssl rand -hex 32): a sign-in started on one replica ends on another, which must check its state with the same secret; a generated one would stay on a single pod's scratch volume." }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "keypool: autoscaling.maxReplicas must not be below autoscaling.minReplicas." }}
{{- end }}
{{- end }}

{{/* Environment of the keypoold container. */}}
{{- define "keypool.env" -}}
{{- $secret := include "keypool.secretName" . -}}
- name: KEYPOOL_LISTEN
  value: ":8080"
- name: KEYPOOL_DATA_DIR
  value: /data
# Temporary files (SQLite's, Go's) go to /data: the root is read-only.
- name: TMPDIR
  value: /data
{{- if eq .Values.database.type "sqlite" }}
- name: KEYPOOL_DATABASE
  value: sqlite:/data/keypool.db
{{- else }}
- name: KEYPOOL_DATABASE
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: database-url
{{- end }}
{{- if or .Values.existingSecret .Values.redis.url }}
- name: KEYPOOL_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: redis-url
      optional: {{ not (empty .Values.existingSecret) }}
{{- end }}
{{- /* With PostgreSQL the replicas must share these two: a pod must not
start without them and generate its own. With SQLite, a missing one is
generated on the volume. */}}
{{- $optional := eq .Values.database.type "sqlite" }}
{{- range $env, $key := dict "KEYPOOL_ADMIN_TOKEN" "admin-token" "KEYPOOL_ENCRYPTION_KEY" "encryption-key" }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
      optional: {{ $optional }}
{{- end }}
{{- range $env, $key := dict "GOOGLE_CLIENT_ID" "google-client-id" "GOOGLE_CLIENT_SECRET" "google-client-secret" "AUTH_BASE_URL" "auth-base-url" "KEYPOOL_OIDC_STATE_SECRET" "oidc-state-secret" }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
      optional: true
{{- end }}
- name: KEYPOOL_LOG_LEVEL
  value: {{ .Values.log.level | quote }}
- name: KEYPOOL_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
- name: KEYPOOL_DRAIN_TIMEOUT
  value: {{ .Values.drainTimeout | quote }}
{{- with .Values.trustedProxies }}
- name: KEYPOOL_TRUSTED_PROXIES
  value: {{ join "," . | quote }}
{{- end }}
{{- if .Values.config }}
- name: KEYPOOL_CONFIG
  value: /etc/keypool/config.yaml
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
