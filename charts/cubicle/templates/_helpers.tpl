{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "cubicle.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name used as the prefix of every object: "<release>-<chart>", or just the release name when
it already contains the chart name. Truncated to 63 characters.
*/}}
{{- define "cubicle.fullname" -}}
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

{{/*
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "cubicle.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "cubicle.labels" -}}
helm.sh/chart: {{ include "cubicle.chart" . }}
{{ include "cubicle.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: cubicle
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the operator pods. Immutable in a Deployment: never add to them.
*/}}
{{- define "cubicle.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cubicle.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "cubicle.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cubicle.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest, or repository:tag (tag defaults to the appVersion).
*/}}
{{- define "cubicle.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
"true" when leader election is on: leaderElection.enabled, or "auto" and replicas > 1.
Refuses replicas > 1 without leader election: two replicas would both write.
*/}}
{{- define "cubicle.leaderElection" -}}
{{- $enabled := .Values.leaderElection.enabled }}
{{- if eq (toString $enabled) "auto" }}
{{- if gt (int .Values.replicas) 1 }}true{{ else }}false{{ end }}
{{- else if $enabled }}
{{- "true" }}
{{- else }}
{{- if gt (int .Values.replicas) 1 }}
{{- fail "leaderElection.enabled=false needs replicas <= 1: two replicas without a Lease would both write" }}
{{- end }}
{{- "false" }}
{{- end }}
{{- end }}

{{/*
The Lease name.
*/}}
{{- define "cubicle.leaseName" -}}
{{- default (printf "%s-leader" (include "cubicle.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Refuses rbac.scope=namespaces without namespaces (the schema says so too; this guards --skip-schema-validation).
*/}}
{{- define "cubicle.checkScope" -}}
{{- if eq .Values.rbac.scope "namespaces" }}
{{- if not .Values.rbac.namespaces }}
{{- fail "rbac.scope=namespaces needs at least one namespace in rbac.namespaces" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The rules the operator needs on namespaced objects. Shared by the cluster-wide ClusterRole and the
per-namespace Roles, so the two scopes grant exactly the same verbs.
  - cubicle.dev kinds: read and watch; the controller never creates or edits their spec.
  - their /status: the controller writes status (patch; update for compare-and-swap).
  - sessions: patch/update to add and remove the finalizer cubicle.dev/usage-accounting,
    delete for the keepalive-expiry action "delete"; sessions/finalizers: update, needed to set
    blockOwnerDeletion on the pods and claims a Session owns.
  - pods: the session's desktop; created, patched (labels/annotations) and deleted on expiry.
  - persistentvolumeclaims: the persistent profile; created and patched, NEVER deleted:
    a user's profile outlives sessions and is only removed by a human.
  - events (core and events.k8s.io): create, and patch to aggregate repeated events.
  - no configmaps or secrets: pods mount them by reference, the operator never reads them.
  - users: use, because the operator writes Sessions (finalizer, expiry delete) that the
    admission policy allows only to who may use their User, and because it grants use on each
    User to its spec.identity (RBAC lets only who holds a permission grant it).
  - roles, rolebindings: the per-User grant of use to its identity (controller/identity.rs):
    applied (create, patch), removed (delete), and listed at start to catch up.
  - userpreferences: get, create, update, patch, only because the per-User Role grants them on
    the User's own preferences to its identity (RBAC lets only who holds a permission grant
    it); the operator never reads or writes a person's preferences.
*/}}
{{- define "cubicle.namespacedRules" -}}
- apiGroups: ["cubicle.dev"]
  resources: ["users", "groups", "workspaces", "serverpools", "servers", "serverassignments", "sessions"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["cubicle.dev"]
  resources: ["users/status", "groups/status", "workspaces/status", "serverpools/status", "servers/status", "serverassignments/status", "sessions/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["cubicle.dev"]
  resources: ["sessions"]
  verbs: ["patch", "update", "delete"]
- apiGroups: ["cubicle.dev"]
  resources: ["sessions/finalizers"]
  verbs: ["update"]
- apiGroups: ["cubicle.dev"]
  resources: ["users"]
  verbs: ["use"]
- apiGroups: ["cubicle.dev"]
  resources: ["userpreferences"]
  verbs: ["get", "create", "update", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
A duration of the values schema's form (500ms, 15s, 2m) in milliseconds.
*/}}
{{- define "cubicle.durationMs" -}}
{{- $d := toString . }}
{{- if regexMatch "^[0-9]+ms$" $d }}
{{- trimSuffix "ms" $d | int64 }}
{{- else if regexMatch "^[0-9]+s$" $d }}
{{- mul (trimSuffix "s" $d | int64) 1000 }}
{{- else if regexMatch "^[0-9]+m$" $d }}
{{- mul (trimSuffix "m" $d | int64) 60000 }}
{{- else }}
{{- fail (printf "%q is not a duration such as 500ms, 15s or 2m" $d) }}
{{- end }}
{{- end }}

{{/*
Refuses lease timings with which two leaders could overlap, as `cubicle run` does: the leader
must give up (renewDeadline) before its Lease runs out for the others (leaseDuration), and retry
(retryPeriod) more often than it gives up. JSON Schema cannot compare two values, so the check
is here.
*/}}
{{- define "cubicle.checkLeaseTimings" -}}
{{- $le := .Values.leaderElection }}
{{- $lease := include "cubicle.durationMs" $le.leaseDuration | int64 }}
{{- $renew := include "cubicle.durationMs" $le.renewDeadline | int64 }}
{{- $retry := include "cubicle.durationMs" $le.retryPeriod | int64 }}
{{- if ge $renew $lease }}
{{- fail (printf "leaderElection.renewDeadline (%s) must be shorter than leaderElection.leaseDuration (%s): a leader must stop before another replica may take the Lease" $le.renewDeadline $le.leaseDuration) }}
{{- end }}
{{- if ge $retry $renew }}
{{- fail (printf "leaderElection.retryPeriod (%s) must be shorter than leaderElection.renewDeadline (%s): a leader must try to renew before it gives up" $le.retryPeriod $le.renewDeadline) }}
{{- end }}
{{- end }}
