{{/* The release's base name, at most 63 characters. */}}
{{- define "fanout.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; takes (dict "ctx" $ "role" "edge"). */}}
{{- define "fanout.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{ include "fanout.selectorLabels" . }}
{{- end -}}

{{- define "fanout.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "fanout.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fanout.jwtSecretName" -}}
{{- .Values.jwt.existingSecret | default (printf "%s-jwt" (include "fanout.fullname" .)) -}}
{{- end -}}

{{/* Settings every role shares: NATS, and the config file. */}}
{{- define "fanout.commonEnv" -}}
- name: FANOUT_NATS_URL
  value: {{ required "nats.url is required (NATS with JetStream, e.g. nats://nats:4222)" .Values.nats.url | quote }}
- name: FANOUT_NATS_SHARDS
  value: {{ .Values.nats.shards | int64 | quote }}
- name: FANOUT_NATS_STREAMS
  value: {{ .Values.nats.streams | int64 | quote }}
- name: FANOUT_NATS_REPLICAS
  value: {{ .Values.nats.replicas | int64 | quote }}
- name: FANOUT_NATS_TLS_REQUIRED
  value: {{ .Values.nats.tlsRequired | quote }}
{{- if .Values.nats.credentialsSecret }}
- name: FANOUT_NATS_CREDENTIALS_FILE
  value: /etc/fanout/nats/nats.creds
{{- end }}
- name: FANOUT_CONFIG
  value: /etc/fanout/config/fanout.toml
{{- end -}}

{{/* Extra FANOUT_* settings from a map. */}}
{{- define "fanout.extraEnv" -}}
{{- range $k, $v := . }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* The config file, and the NATS credentials if any. */}}
{{- define "fanout.volumeMounts" -}}
- name: config
  mountPath: /etc/fanout/config
  readOnly: true
{{- if .Values.nats.credentialsSecret }}
- name: nats-credentials
  mountPath: /etc/fanout/nats
  readOnly: true
{{- end }}
{{- if .Values.auth.keysSecret }}
- name: auth-keys
  mountPath: /etc/fanout/keys
  readOnly: true
{{- end }}
{{- end -}}

{{- define "fanout.volumes" -}}
- name: config
  configMap:
    name: {{ include "fanout.fullname" . }}-config
{{- if .Values.nats.credentialsSecret }}
- name: nats-credentials
  secret:
    secretName: {{ .Values.nats.credentialsSecret }}
{{- end }}
{{- if .Values.auth.keysSecret }}
- name: auth-keys
  secret:
    secretName: {{ .Values.auth.keysSecret }}
{{- end }}
{{- end -}}

{{/* The edge's token keys beyond the JWT secret: PEM public keys mounted
from auth.keysSecret, opaque project keys from auth.projectKeysSecret. */}}
{{- define "fanout.authEnv" -}}
{{- with .Values.auth.publicKeys }}
{{- if not $.Values.auth.keysSecret }}{{ fail "auth.publicKeys needs auth.keysSecret (the Secret holding the PEM files)" }}{{ end }}
- name: FANOUT_AUTH_PUBLIC_KEYS
  value: {{ include "fanout.publicKeys" . | quote }}
{{- end }}
{{- if .Values.auth.projectKeysSecret }}
- name: FANOUT_AUTH_PROJECT_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.projectKeysSecret }}
      key: {{ .Values.auth.projectKeysKey }}
{{- end }}
{{- end -}}

{{- define "fanout.publicKeys" -}}
{{- range $i, $k := . }}{{ if $i }},{{ end }}{{ with $k.kid }}{{ . }}={{ end }}{{ $k.alg }}:/etc/fanout/keys/{{ $k.file }}{{ end }}
{{- end -}}

{{/* /healthz answers while the process runs; /readyz only while it can serve (503 without NATS, or draining). */}}
{{- define "fanout.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: admin}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: admin}
  periodSeconds: 2
  timeoutSeconds: 2
  failureThreshold: 2
{{- end -}}

{{/* Prefer one replica per node, so one node's loss leaves the other. */}}
{{- define "fanout.spreadOverNodes" -}}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "fanout.selectorLabels" . | nindent 14 }}
{{- end -}}

{{/* One TOML value: a string, a boolean or a number (whole numbers as
integers: values arrive as floats). */}}
{{- define "fanout.tomlValue" -}}
{{- if kindIs "string" . -}}
{{ toJson . }}
{{- else if kindIs "bool" . -}}
{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- if eq (float64 .) (float64 (int64 .)) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if kindIs "slice" . -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "fanout.tomlValue" $v }}{{ end }}]
{{- else if kindIs "map" . -}}
{ {{- range $i, $k := keys . | sortAlpha }}{{ if $i }},{{ end }} {{ toJson $k }} = {{ include "fanout.tomlValue" (get $ $k) }}{{ end }} }
{{- else -}}
{{ fail (printf "config: %v is not a string, number, boolean, list or map" .) }}
{{- end -}}
{{- end -}}

{{/* .Values.config as fanout's TOML file: top-level keys, then one table
per section. Deeper values (auth.tables, auth.channels) become TOML inline
tables and arrays. */}}
{{- define "fanout.toml" -}}
# fanout settings from the chart's `config` value (README, "Configuration").
{{- range $k, $v := . }}
{{- if not (kindIs "map" $v) }}
{{ $k }} = {{ include "fanout.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $k, $v := . }}
{{- if kindIs "map" $v }}

[{{ $k }}]
{{- range $k2, $v2 := $v }}
{{ $k2 }} = {{ include "fanout.tomlValue" $v2 }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Pods restart (rolling) when the config file changes. */}}
{{- define "fanout.configChecksum" -}}
checksum/config: {{ include "fanout.toml" .Values.config | sha256sum }}
{{- end -}}
