{{/*
Every helper below that a Deployment includes takes one argument, either
- the chart's own root context (`.`), as this chart's templates pass it, or
- from a parent chart that has this chart as a dependency, the Bitnami common-chart idiom: the
  subchart's values and the parent's root context,
    (dict "chartValues" .Values.tokenBroker "context" $)
  (`tokenBroker` is the dependency's alias; without an alias: (index .Values "token-broker")).
A parent's own `.` carries the parent's values, not this chart's: passing it fails.
"token-broker.call" turns either into a context with this chart's .Values and calls `tpl`.
*/}}
{{- define "token-broker.call" -}}
{{- $ctx := .ctx -}}
{{- if and (kindIs "map" $ctx) (hasKey $ctx "chartValues") -}}
{{- if not (hasKey $ctx "context") -}}
{{- fail "token-broker helpers: pass (dict \"chartValues\" .Values.tokenBroker \"context\" $)" -}}
{{- end -}}
{{- $ctx = dict "Values" $ctx.chartValues "Release" $ctx.context.Release "Chart" $ctx.context.Chart "Capabilities" $ctx.context.Capabilities "Template" $ctx.context.Template -}}
{{- end -}}
{{- if not (and (kindIs "map" $ctx.Values) (hasKey $ctx.Values "image") (hasKey $ctx.Values "config")) -}}
{{- fail "token-broker helpers: these values are not token-broker's; from a parent chart pass (dict \"chartValues\" .Values.tokenBroker \"context\" $)" -}}
{{- end -}}
{{- include .tpl $ctx -}}
{{- end -}}

{{/* Names and labels. */}}
{{- define "token-broker.fullname" -}}
{{- printf "%s-token-broker" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The example workload's Deployment: <release>-<workload.name>. */}}
{{- define "token-broker.workloadName" -}}
{{- printf "%s-%s" .Release.Name .Values.workload.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "token-broker.labels" -}}
app.kubernetes.io/part-of: token-broker
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
The directory shared by the sidecar and its callers (an emptyDir in memory): the API's unix
socket and any token files (sinks) live there.
*/}}
{{- define "token-broker.runDir" -}}/run/token-broker{{- end -}}

{{/* "true" when the API listens on a unix socket (the recommended mode). */}}
{{- define "token-broker.socketMode" -}}
{{- if hasPrefix "unix:" .Values.config.server.listen -}}
{{- $path := trimPrefix "unix:" .Values.config.server.listen -}}
{{- if ne (dir $path) (include "token-broker.runDir" .) -}}
{{- fail (printf "config.server.listen: the socket must be in %s (the shared emptyDir), not %s" (include "token-broker.runDir" .) $path) -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when some client is identified by a key (it has neither uids nor gids). */}}
{{- define "token-broker.usesKeys" -}}
{{- range $name, $client := .Values.config.clients -}}
{{- if not (or $client.uids $client.gids) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{- define "token-broker.storeUrl" -}}
{{- if .Values.config.store.url -}}
{{- .Values.config.store.url -}}
{{- else -}}
{{- printf "redis://%s-redis:6379/0" (include "token-broker.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The broker config, with secret file paths filled in. */}}
{{- define "token-broker.config" -}}
{{- include "token-broker.call" (dict "tpl" "token-broker.config.body" "ctx" .) -}}
{{- end -}}

{{- define "token-broker.config.body" -}}
{{- $server := .Values.config.server }}
{{- if not (include "token-broker.socketMode" .) }}
{{- /* The chart's socket defaults do not apply to a TCP listen address. */}}
{{- $server = omit $server "socket_mode" "socket_group" }}
{{- end -}}
server:
  {{- toYaml $server | nindent 2 }}
store:
  url: {{ include "token-broker.storeUrl" . }}
  key_prefix: {{ .Values.config.store.key_prefix }}
  encryption_key_file: /etc/token-broker/store/store.key
  password_file: /etc/token-broker/redis/password
  {{- if hasKey .Values.config.store "require_replica_ack" }}
  require_replica_ack: {{ .Values.config.store.require_replica_ack }}
  {{- end }}
  {{- if hasKey .Values.config.store "replica_ack_timeout" }}
  replica_ack_timeout: {{ .Values.config.store.replica_ack_timeout | quote }}
  {{- end }}
apps:
{{- range $name, $app := .Values.config.apps }}
  {{- $files := dict }}
  {{- $exchange := eq (default "" $app.assertion_type) "token-exchange" }}
  {{- if not (or (hasKey $app "client_id") $exchange) }}{{- $_ := set $files "client_id_file" (printf "/etc/token-broker/apps/%s/client_id" $name) }}{{- end }}
  {{- $appSecret := index (default dict $.Values.secrets.apps) $name | default dict }}
  {{- $auth := default "client_secret_post" $app.client_auth }}
  {{- if eq $auth "private_key_jwt" }}{{- $_ := set $files "private_key_file" (printf "/etc/token-broker/apps/%s/private_key" $name) }}
  {{- else if eq $auth "client_assertion" }}
  {{- /* The pod's projected service-account token, unless the app names its own file. */}}
  {{- if not (hasKey $app "assertion_file") }}
  {{- if not $.Values.serviceAccountToken.enabled }}
  {{- fail (printf "config.apps.%s: client_assertion needs assertion_file, or serviceAccountToken.enabled" $name) }}
  {{- end }}
  {{- $_ := set $files "assertion_file" $.Values.serviceAccountToken.path }}
  {{- end }}
  {{- else if eq $auth "tls_client_auth" }}
  {{- /* tls.crt and tls.key: the keys of a kubernetes.io/tls Secret (cert-manager's). */}}
  {{- $_ := set $files "tls_client_cert_file" (printf "/etc/token-broker/apps/%s/tls.crt" $name) }}
  {{- $_ := set $files "tls_client_key_file" (printf "/etc/token-broker/apps/%s/tls.key" $name) }}
  {{- else }}{{- $_ := set $files "client_secret_file" (printf "/etc/token-broker/apps/%s/client_secret" $name) }}
  {{- end }}
  {{- /* The pre-rotation secret, tried after invalid_client, when the values give one. */}}
  {{- if $appSecret.client_secret_previous }}{{- $_ := set $files "client_secret_previous_file" (printf "/etc/token-broker/apps/%s/client_secret_previous" $name) }}{{- end }}
  {{- range $i, $sink := $app.sinks }}
  {{- if ne (dir $sink.path) (include "token-broker.runDir" $) }}
  {{- fail (printf "config.apps.%s.sinks[%d].path: token files go in %s (the shared emptyDir)" $name $i (include "token-broker.runDir" $)) }}
  {{- end }}
  {{- end }}
  {{ $name }}:
    {{- toYaml (merge (deepCopy $app) $files) | nindent 4 }}
{{- end }}
clients:
{{- range $name, $client := .Values.config.clients }}
  {{ $name }}:
    {{- if not (or $client.uids $client.gids) }}
    key_file: {{ printf "/etc/token-broker/clients/%s.key" $name }}
    {{- end }}
    {{- toYaml $client | nindent 4 }}
{{- end }}
{{- end -}}

{{/*
The sidecar: include it under `initContainers:` of your own pod spec (a native sidecar,
Kubernetes >= 1.29), and "token-broker.volumes" under `volumes:`.
*/}}
{{- define "token-broker.sidecar" -}}
{{- include "token-broker.call" (dict "tpl" "token-broker.sidecar.body" "ctx" .) -}}
{{- end -}}

{{- define "token-broker.sidecar.body" -}}
- name: token-broker
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  restartPolicy: Always
  args: ["serve", "--config", "/etc/token-broker/config/config.yaml"]
  ports:
    - name: metrics
      containerPort: 9411
      protocol: TCP
  {{- /* Gates the main containers until every required app has its first token. */}}
  startupProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml .Values.probes.startup | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    periodSeconds: 10
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: token-broker-config
      mountPath: /etc/token-broker/config
      readOnly: true
    {{- range $name, $app := .Values.config.apps }}
    {{- if include "token-broker.appSecret" (dict "name" $name "app" $app "Values" $.Values) }}
    - name: token-broker-app-{{ $name }}
      mountPath: /etc/token-broker/apps/{{ $name }}
      readOnly: true
    {{- end }}
    {{- end }}
    {{- if .Values.serviceAccountToken.enabled }}
    - name: token-broker-sa-token
      mountPath: {{ dir .Values.serviceAccountToken.path }}
      readOnly: true
    {{- end }}
    {{- if include "token-broker.usesKeys" . }}
    - name: token-broker-client-keys
      mountPath: /etc/token-broker/clients
      readOnly: true
    {{- end }}
    - name: token-broker-store-key
      mountPath: /etc/token-broker/store
      readOnly: true
    - name: token-broker-redis-password
      mountPath: /etc/token-broker/redis
      readOnly: true
    - name: token-broker-tmp
      mountPath: /tmp
    - name: token-broker-run
      mountPath: {{ include "token-broker.runDir" . }}
{{- end -}}

{{/*
For each container that calls the broker: under its `volumeMounts:`. It reaches the socket (and
reads token files) there; read-only still lets it connect. Run that container as its own uid
(securityContext.runAsUser) and list the uid in its client's `uids`.
*/}}
{{- define "token-broker.callerMount" -}}
{{- include "token-broker.call" (dict "tpl" "token-broker.callerMount.body" "ctx" .) -}}
{{- end -}}

{{- define "token-broker.callerMount.body" -}}
- name: token-broker-run
  mountPath: {{ include "token-broker.runDir" . }}
  readOnly: true
{{- end -}}

{{- define "token-broker.volumes" -}}
{{- include "token-broker.call" (dict "tpl" "token-broker.volumes.body" "ctx" .) -}}
{{- end -}}

{{- define "token-broker.volumes.body" -}}
{{- $full := include "token-broker.fullname" . -}}
- name: token-broker-config
  configMap:
    name: {{ $full }}-config
{{- range $name, $app := .Values.config.apps }}
{{- if include "token-broker.appSecret" (dict "name" $name "app" $app "Values" $.Values) }}
- name: token-broker-app-{{ $name }}
  secret:
    secretName: {{ $full }}-app-{{ $name }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- if .Values.serviceAccountToken.enabled }}
{{- /* The kubelet writes the token for this audience and rewrites it before it expires (at
80% of expirationSeconds); the broker re-reads the file when it changes. */}}
- name: token-broker-sa-token
  projected:
    defaultMode: 0440
    sources:
      - serviceAccountToken:
          audience: {{ required "serviceAccountToken.audience: the audience your IdP's federation trusts" .Values.serviceAccountToken.audience | quote }}
          expirationSeconds: {{ int .Values.serviceAccountToken.expirationSeconds }}
          path: {{ base .Values.serviceAccountToken.path }}
{{- end }}
{{- if include "token-broker.usesKeys" . }}
- name: token-broker-client-keys
  secret:
    secretName: {{ $full }}-client-keys
    defaultMode: 0440
{{- end }}
- name: token-broker-store-key
  secret:
    secretName: {{ $full }}-store-key
    defaultMode: 0440
- name: token-broker-redis-password
  secret:
    secretName: {{ $full }}-redis
    defaultMode: 0440
- name: token-broker-tmp
  emptyDir:
    sizeLimit: 16Mi
- name: token-broker-run
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end -}}

{{/*
"true" when an app reads files from its Secret: every app but a client_assertion one with an
inline client_id, or a token exchange that needs none (its credential is the projected token),
and no secrets.apps entry.
*/}}
{{- define "token-broker.appSecret" -}}
{{- $named := or (hasKey .app "client_id") (eq (default "" .app.assertion_type) "token-exchange") }}
{{- $federated := and (eq (default "" .app.client_auth) "client_assertion") $named }}
{{- if or (not $federated) (index (default dict .Values.secrets.apps) .name) }}true{{ end }}
{{- end -}}

{{- define "token-broker.podSecurityContext" -}}
{{- include "token-broker.call" (dict "tpl" "token-broker.podSecurityContext.body" "ctx" .) -}}
{{- end -}}

{{- define "token-broker.podSecurityContext.body" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}
