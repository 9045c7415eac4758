{{/*
Names, labels, images and the checks every render runs. Everything a template needs more
than once is defined here once.
*/}}

{{/* The chart's name, 63 characters at most (a DNS label). */}}
{{- define "tokenfab.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The release's base name for every object: the release name when it already contains the
chart's name, else "<release>-<chart>". 63 characters at most; objects add short suffixes,
so keep release names short (40 characters leaves room for every suffix).
*/}}
{{- define "tokenfab.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tokenfab.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels that select a component's pods: they never change over upgrades. */}}
{{- define "tokenfab.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenfab.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every object's labels. Call with (dict "root" $ "component" "control-plane"). */}}
{{- define "tokenfab.labels" -}}
helm.sh/chart: {{ include "tokenfab.chart" .root }}
{{ include "tokenfab.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tokenfab
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
An image reference from one entry of .Values.images. global.imageRegistry, when set,
replaces the image's own registry (an air-gapped mirror); a digest wins over a tag; the
tokenfab image's tag defaults to the chart's appVersion.
Call with (dict "root" $ "image" .Values.images.tokenfab "defaultTag" $.Chart.AppVersion).
*/}}
{{- define "tokenfab.image" -}}
{{- $registry := .image.registry -}}
{{- if .root.Values.global.imageRegistry -}}
{{- $registry = .root.Values.global.imageRegistry -}}
{{- end -}}
{{- $repository := .image.repository -}}
{{- if $registry -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" $registry) .image.repository -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .defaultTag .image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets of every pod (global.imagePullSecrets). */}}
{{- define "tokenfab.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ .name | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The namespace's DNS suffix: "<namespace>.svc.<clusterDomain>". */}}
{{- define "tokenfab.svcDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.global.clusterDomain -}}
{{- end -}}

{{/* The control plane's gRPC URL, as agents and the tenant CLI in the cluster reach it. */}}
{{- define "tokenfab.controlUrl" -}}
{{- $scheme := ternary "https" "http" (.Values.tls.enabled | default false) -}}
{{- if .Values.controlPlane.ha.enabled -}}
{{- include "tokenfab.replicaUrls" . -}}
{{- else -}}
{{- printf "%s://%s.%s:%v" $scheme (include "tokenfab.fullname" .) (include "tokenfab.svcDomain" .) .Values.controlPlane.ports.grpc -}}
{{- end -}}
{{- end -}}

{{/*
The control plane's HTTP URL (/metrics, /healthz, /v1/sla, /v1/tuning) through its Service,
as the operator in the cluster reaches it.
*/}}
{{- define "tokenfab.httpUrl" -}}
{{- $scheme := ternary "https" "http" (.Values.tls.enabled | default false) -}}
{{- printf "%s://%s.%s:%v" $scheme (include "tokenfab.fullname" .) (include "tokenfab.svcDomain" .) .Values.controlPlane.ports.http -}}
{{- end -}}

{{/*
A component's selector labels as a label selector string ("k=v,k=v", keys sorted), for
flags that take one. Call with (dict "root" $ "component" "agent").
*/}}
{{- define "tokenfab.selectorString" -}}
{{- $labels := include "tokenfab.selectorLabels" . | fromYaml -}}
{{- $pairs := list -}}
{{- range $k := keys $labels | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%s" $k (index $labels $k)) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* The operator's ThroughputSLA object: operator.slaName, else the release's base name. */}}
{{- define "tokenfab.slaName" -}}
{{- default (include "tokenfab.fullname" .) .Values.operator.slaName -}}
{{- end -}}

{{/* Secret names: the one given in existingSecret, else the one the chart creates. */}}
{{- define "tokenfab.agentSecretName" -}}
{{- default (printf "%s-agent-secret" (include "tokenfab.fullname" .)) .Values.secrets.agent.existingSecret -}}
{{- end -}}
{{- define "tokenfab.adminSecretName" -}}
{{- default (printf "%s-admin-token" (include "tokenfab.fullname" .)) .Values.secrets.admin.existingSecret -}}
{{- end -}}
{{- define "tokenfab.httpSecretName" -}}
{{- default (printf "%s-http-token" (include "tokenfab.fullname" .)) .Values.secrets.http.existingSecret -}}
{{- end -}}
{{- define "tokenfab.tenantsSecretName" -}}
{{- default (printf "%s-tenants" (include "tokenfab.fullname" .)) .Values.tenants.existingSecret -}}
{{- end -}}

{{/*
A generated secret value that survives upgrades: the value already in the cluster's Secret
when there is one (Helm's lookup; an offline render finds none), else 48 random characters.
Call with (dict "root" $ "name" SECRET "key" KEY).
*/}}
{{- define "tokenfab.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}

{{/* Service account names. */}}
{{/* Call with (dict "root" $ "key" "controlPlane" "suffix" "control-plane"). */}}
{{- define "tokenfab.serviceAccountName" -}}
{{- $sa := index .root.Values.serviceAccounts .key -}}
{{- if $sa.create -}}
{{- default (printf "%s-%s" (include "tokenfab.fullname" .root) .suffix) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{/*
The gRPC URL of every control-plane replica (through the headless Service's per-pod names),
comma-separated: agents given them all talk to whichever is elected (only it listens).
*/}}
{{- define "tokenfab.replicaUrls" -}}
{{- $full := include "tokenfab.fullname" . -}}
{{- $scheme := ternary "https" "http" (.Values.tls.enabled | default false) -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.controlPlane.replicas) -}}
{{- $urls = append $urls (printf "%s://%s-%d.%s-peers.%s:%v" $scheme $full $i $full (include "tokenfab.svcDomain" $) $.Values.controlPlane.ports.grpc) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* The Raft group: every replica's peer URL through the headless Service, ID=URL (a pod
NAME-N is Raft id N+1, as `tokenfab server` derives from its host name). */}}
{{- define "tokenfab.raftPeers" -}}
{{- $full := include "tokenfab.fullname" . -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.controlPlane.replicas) -}}
{{- $peers = append $peers (printf "%d=http://%s-%d.%s-peers.%s:%v" (add1 $i) $full $i $full (include "tokenfab.svcDomain" $) $.Values.controlPlane.ha.raft.peerPort) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* The replicas' key prefix in etcd. */}}
{{- define "tokenfab.etcdPrefix" -}}
{{- default (printf "/tokenfab/%s/%s" .Release.Namespace .Release.Name) .Values.controlPlane.ha.etcd.prefix -}}
{{- end -}}

{{/*
The agent's --replica arguments, one per vLLM engine of the chart (reached through its
node-local Service). Each is url=...,model=...,id=...,engine-model=...,window=...,max=...
and, where the engine names them, gpus=...
*/}}
{{- define "tokenfab.agentReplicaArgs" -}}
{{- $full := include "tokenfab.fullname" . -}}
{{- range .Values.engines.vllm }}
{{- $served := default .model .servedModelName }}
{{- $spec := printf "url=http://%s-vllm-%s.%s:%v,model=%s,id=%s,engine-model=%s,window=%v,max=%v" $full .name (include "tokenfab.svcDomain" $) $.Values.engines.vllmDefaults.port .model .name $served (.window | default 64) (.maxNumSeqs | default 256) }}
{{- with .gpus }}{{ $spec = printf "%s,gpus=%s" $spec . }}{{ end }}
- {{ printf "--replica=%s" $spec | quote }}
{{- end }}
{{- end -}}

{{/*
What an engine runs, as the Kubernetes operator reads it from the Deployment's labels: the
model, the accelerator class (when given) and the tensor-parallel degree. Call with an entry
of engines.vllm.
*/}}
{{- define "tokenfab.engineKindLabels" -}}
tokenfab.io/model: {{ .model | quote }}
{{- with .accelerator }}
tokenfab.io/accelerator: {{ . | quote }}
{{- end }}
tokenfab.io/tensor-parallel: {{ .tensorParallelSize | quote }}
{{- end -}}

{{/* An HTTP probe. Call with (dict "path" P "port" NAME "scheme" HTTP|HTTPS "probe" VALUES). */}}
{{- define "tokenfab.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
  scheme: {{ .scheme }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end -}}

{{/*
Checks on combinations of values that the schema cannot state with a message a person can
act on. Included by the control plane's StatefulSet, so every render runs them.
*/}}
{{- define "tokenfab.validate" -}}
{{- $cp := .Values.controlPlane -}}
{{- if and (gt (int $cp.replicas) 1) (not $cp.ha.enabled) -}}
{{- fail (printf "controlPlane.replicas is %v, but without controlPlane.ha.enabled each replica keeps its state in a store of its own: replicas beyond the first would be independent control planes, each with its own batches. More replicas need controlPlane.ha.enabled=true (the Raft store backend by default, or etcd with controlPlane.ha.store=etcd), or keep controlPlane.replicas=1." $cp.replicas) -}}
{{- end -}}
{{- if and $cp.ha.enabled (eq $cp.ha.store "raft") (or (lt (int $cp.replicas) 3) (eq (mod (int $cp.replicas) 2) 0)) -}}
{{- fail (printf "controlPlane.ha.store=raft needs an odd number of replicas, 3 or more (a majority must run: 3 survive the loss of 1, 5 of 2), not %v." $cp.replicas) -}}
{{- end -}}
{{- if and $cp.ha.enabled (eq $cp.ha.store "etcd") (lt (int $cp.replicas) 2) -}}
{{- fail (printf "controlPlane.ha.enabled needs at least 2 replicas (one serves, another takes over when it stops; etcd holds the quorum), not %v." $cp.replicas) -}}
{{- end -}}
{{- if and $cp.ha.enabled (eq $cp.ha.store "etcd") (not $cp.ha.etcd.endpoints) -}}
{{- fail "controlPlane.ha.store=etcd needs controlPlane.ha.etcd.endpoints: the client URLs of the etcd cluster the replicas share (e.g. http://etcd-0.etcd:2379)." -}}
{{- end -}}
{{- if and $cp.ha.enabled (not $cp.persistence.enabled) -}}
{{- fail "controlPlane.ha.enabled needs controlPlane.persistence.enabled: each peer keeps its copy of the state on its own volume." -}}
{{- end -}}
{{- if and (not .Values.tenants.existingSecret) (not .Values.tenants.entries) (not .Values.tenants.generated) -}}
{{- fail "no tenant: the control plane refuses to start without one. List tenants.entries (name and tokenSha256), keep tenants.generated, or name tenants.existingSecret." -}}
{{- end -}}
{{- if and .Values.agent.enabled (not .Values.engines.vllm) (not .Values.engines.external) -}}
{{- fail "agent.enabled is true but no engine is configured: list engines.vllm (vLLM Deployments the chart runs) or engines.external (endpoints you run), or set agent.enabled=false." -}}
{{- end -}}
{{- if and (eq .Values.agent.auth.mode "nodeTokens") (not .Values.agent.auth.nodeTokensSecret) -}}
{{- fail "agent.auth.mode=nodeTokens needs agent.auth.nodeTokensSecret: a Secret with one key per node name holding that node's token (tokenfab admin node-token NODE)." -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.enabled needs tls.existingSecret: a kubernetes.io/tls Secret (tls.crt, tls.key, and ca.crt for the agents) whose certificate names the control plane's Service." -}}
{{- end -}}
{{- if and .Values.tls.mutual.enabled (not .Values.tls.enabled) -}}
{{- fail "tls.mutual.enabled needs tls.enabled: agents present client certificates only over TLS." -}}
{{- end -}}
{{- if and .Values.tls.mutual.enabled (or (not .Values.tls.mutual.agentCaSecret) (not .Values.tls.mutual.agentCertsSecret)) -}}
{{- fail "tls.mutual.enabled needs tls.mutual.agentCaSecret (the CA of the agents' client certificates, key ca.crt) and tls.mutual.agentCertsSecret (NODE.crt and NODE.key for every node)." -}}
{{- end -}}
{{- include "tokenfab.validateOperator" . -}}
{{- $names := dict -}}
{{- range .Values.engines.vllm -}}
{{- if hasKey $names .name -}}
{{- fail (printf "engines.vllm: the name %q is used twice; each engine needs its own name (it names the Deployment, the Service and the agent's replica id)." .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- range .Values.engines.external -}}
{{- if hasKey $names .name -}}
{{- fail (printf "engines.external: the name %q is used twice or also names a vLLM engine; each replica needs its own name." .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- end -}}

{{/* Checks of operator.enabled against the rest of the values. */}}
{{- define "tokenfab.validateOperator" -}}
{{- $o := .Values.operator -}}
{{- if $o.enabled -}}
{{- if .Values.tls.enabled -}}
{{- fail "operator.enabled with tls.enabled: with TLS the control plane's HTTP port serves only HTTPS, and tokenfab-operator reads /v1/tuning and /v1/sla over plain HTTP (it has no TLS client and no flag for a CA). Keep operator.enabled=false while tls.enabled=true." -}}
{{- end -}}
{{- if and (not .Values.serviceAccounts.operator.create) (not .Values.serviceAccounts.operator.name) -}}
{{- fail "operator.enabled with serviceAccounts.operator.create=false needs serviceAccounts.operator.name (an existing account): the chart does not give the operator's permissions to the namespace's default account." -}}
{{- end -}}
{{- if and $o.followDrain (ne .Values.agent.drainLabel "tokenfab.io/drain") -}}
{{- fail (printf "operator.followDrain: the operator labels cordoned nodes tokenfab.io/drain=cordoned, so agent.drainLabel must be tokenfab.io/drain (it is %q), or the agents would not stop; or set operator.followDrain=false." .Values.agent.drainLabel) -}}
{{- end -}}
{{- $kinds := dict -}}
{{- range .Values.engines.vllm -}}
{{- if not .accelerator -}}
{{- fail (printf "operator.enabled: engines.vllm %q has no accelerator. The operator plans placement per accelerator class and reads it from the Deployment's label tokenfab.io/accelerator: set accelerator to the catalog class of its nodes (e.g. h100-sxm, l40s)." .name) -}}
{{- end -}}
{{- if not .gpuProduct -}}
{{- fail (printf "operator.enabled: engines.vllm %q has no gpuProduct. The operator counts its pods as running on %s nodes: set gpuProduct (the nodes' nvidia.com/gpu.product) so that Kubernetes keeps them there." .name .accelerator) -}}
{{- end -}}
{{- $kind := printf "%s on %s (tensor parallel %v)" .model .accelerator .tensorParallelSize -}}
{{- if hasKey $kinds $kind -}}
{{- fail (printf "operator.enabled: engines.vllm %q and %q both run %s; the operator scales only the first Deployment of a kind (and the second to 0): keep one engine per model, accelerator and tensorParallelSize." (index $kinds $kind) .name $kind) -}}
{{- end -}}
{{- $_ := set $kinds $kind .name -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Peers of a control plane with more than one replica on different nodes (or zones). */}}
{{- define "tokenfab.controlPlaneAntiAffinity" -}}
{{- $ha := .Values.controlPlane.ha -}}
{{- if eq $ha.antiAffinity "hard" }}
requiredDuringSchedulingIgnoredDuringExecution:
  - topologyKey: {{ $ha.topologyKey }}
    labelSelector:
      matchLabels:
        {{- include "tokenfab.selectorLabels" (dict "root" $ "component" "control-plane") | nindent 8 }}
{{- else }}
preferredDuringSchedulingIgnoredDuringExecution:
  - weight: 100
    podAffinityTerm:
      topologyKey: {{ $ha.topologyKey }}
      labelSelector:
        matchLabels:
          {{- include "tokenfab.selectorLabels" (dict "root" $ "component" "control-plane") | nindent 10 }}
{{- end }}
{{- end -}}

{{/*
The agents' affinity: agent.affinity, with every node selector term also requiring that the
node does not carry agent.drainLabel. Labelling a node with it removes the node's agent,
which drains on SIGTERM (docs/operations.md, "Drain a node").
*/}}
{{- define "tokenfab.agentAffinity" -}}
{{- $a := .Values.agent -}}
{{- $affinity := deepCopy $a.affinity -}}
{{- if $a.drainLabel -}}
{{- $notDrained := dict "key" $a.drainLabel "operator" "DoesNotExist" -}}
{{- $nodeAffinity := $affinity.nodeAffinity | default dict -}}
{{- $required := $nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution | default dict -}}
{{- $terms := list -}}
{{- range ($required.nodeSelectorTerms | default (list dict)) -}}
{{- $term := deepCopy . -}}
{{- $_ := set $term "matchExpressions" (append ($term.matchExpressions | default list) $notDrained) -}}
{{- $terms = append $terms $term -}}
{{- end -}}
{{- $_ := set $required "nodeSelectorTerms" $terms -}}
{{- $_ := set $nodeAffinity "requiredDuringSchedulingIgnoredDuringExecution" $required -}}
{{- $_ := set $affinity "nodeAffinity" $nodeAffinity -}}
{{- end -}}
{{- toYaml $affinity -}}
{{- end -}}

{{/* The sweep's run name: sweep.name, else the release's base name. */}}
{{- define "tokenfab.sweepName" -}}
{{- default (include "tokenfab.fullname" .) .Values.sweep.name -}}
{{- end -}}

{{/*
How many configurations the sweep has: the product of the number of values of every
sweep.vary entry, as `tokenfab sim sweep` combines them. It is the Indexed Job's completions.
*/}}
{{- define "tokenfab.sweepConfigurations" -}}
{{- $count := 1 -}}
{{- range .Values.sweep.vary -}}
{{- $count = mul $count (len .values) -}}
{{- end -}}
{{- $count -}}
{{- end -}}

{{/*
One --vary argument, PATH=V1,V2,... Whole numbers are written as integers: Helm reads every
number of a values file as a float, which would otherwise print 1000000 as 1e+06 (that the
simulator refuses for a count). Call with an entry of sweep.vary.
*/}}
{{- define "tokenfab.varyArg" -}}
{{- $values := list -}}
{{- range .values -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- $values = append $values (printf "%d" (int64 .)) -}}
{{- else -}}
{{- $values = append $values (toString .) -}}
{{- end -}}
{{- end -}}
{{- printf "--vary=%s=%s" .path (join "," $values) -}}
{{- end -}}

{{/*
A duration of the schema's form (e.g. 2h, 1h30m, 90s, 1d) in whole seconds, at least 1.
*/}}
{{- define "tokenfab.durationSeconds" -}}
{{- $seconds := dict "ms" 0 "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800 -}}
{{- $total := 0 -}}
{{- $millis := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d|w)" . -1 -}}
{{- $n := regexFind "^[0-9]+" . | int64 -}}
{{- $unit := regexReplaceAll "^[0-9]+" . "" -}}
{{- if eq $unit "ms" -}}
{{- $millis = add $millis $n -}}
{{- else -}}
{{- $total = add $total (mul $n (get $seconds $unit)) -}}
{{- end -}}
{{- end -}}
{{- max 1 (add $total (div (add $millis 999) 1000)) -}}
{{- end -}}

{{/*
The ConfigMap key of a file of sweep.files: its path with every character a key may not hold
("/" of a subfolder) as "_". The volume puts it back at its path beside the scenario.
*/}}
{{- define "tokenfab.sweepFileKey" -}}
{{- regexReplaceAll "[^-._a-zA-Z0-9]" . "_" -}}
{{- end -}}

{{/* Checks of sweep.enabled against the rest of sweep's values. */}}
{{- define "tokenfab.validateSweep" -}}
{{- $s := .Values.sweep -}}
{{- if not $s.scenario -}}
{{- fail "sweep.enabled needs sweep.scenario: the scenario file's text, e.g. --set-file sweep.scenario=simulations/single-h100-node.yaml." -}}
{{- end -}}
{{- if not $s.vary -}}
{{- fail "sweep.enabled needs at least one sweep.vary entry (path and values), e.g. {path: \"pools[0].nodes\", values: [1, 2, 4]}: a sweep runs one configuration per combination of their values." -}}
{{- end -}}
{{- if not $s.resultsClaim -}}
{{- fail "sweep.enabled needs sweep.resultsClaim: an existing PersistentVolumeClaim in the release's namespace with access mode ReadWriteMany, since the sweep's pods on several nodes write their results to it at once." -}}
{{- end -}}
{{- $name := include "tokenfab.sweepName" . -}}
{{- if gt (len $name) 50 -}}
{{- fail (printf "the sweep's name %q is longer than 50 characters, too long for its Jobs' names (<name>-sweep-gather is at most 63): set sweep.name to a shorter name." $name) -}}
{{- end -}}
{{- $paths := dict -}}
{{- range $s.vary -}}
{{- if hasKey $paths .path -}}
{{- fail (printf "sweep.vary names %s twice: the simulator would keep only the last value of each combination. List its values in one entry." .path) -}}
{{- end -}}
{{- $_ := set $paths .path true -}}
{{- end -}}
{{- $count := include "tokenfab.sweepConfigurations" . | int -}}
{{- if gt $count 100000 -}}
{{- fail (printf "sweep.vary makes %d configurations; an Indexed Job with backoffLimitPerIndex has at most 100000 indexes. Split the sweep into several runs (each its own sweep.name)." $count) -}}
{{- end -}}
{{- $keys := dict "scenario.yaml" "the scenario" -}}
{{- range $file, $_ := $s.files -}}
{{- $key := include "tokenfab.sweepFileKey" $file -}}
{{- if hasKey $keys $key -}}
{{- fail (printf "sweep.files: %q collides with %s (both are kept under the ConfigMap key %q, /scenario/scenario.yaml being the scenario itself): rename one." $file (index $keys $key) $key) -}}
{{- end -}}
{{- $_ := set $keys $key (printf "%q" $file) -}}
{{- end -}}
{{- end -}}

{{/*
The pod template metadata of the sweep's Jobs: the selector labels and sweep.podLabels, not
the chart's version (a Job's pod template cannot change), and the checksum of the scenario.
Call with (dict "root" $ "component" "sweep" "checksum" SUM).
*/}}
{{- define "tokenfab.sweepPodMetadata" -}}
{{- $s := .root.Values.sweep -}}
metadata:
  labels:
    {{- include "tokenfab.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/part-of: tokenfab
    {{- with $s.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/scenario: {{ .checksum }}
    {{- with $s.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* What the pods of both sweep Jobs share. */}}
{{- define "tokenfab.sweepPodSpec" -}}
{{- $s := .Values.sweep -}}
restartPolicy: Never
automountServiceAccountToken: false
enableServiceLinks: false
{{- with (include "tokenfab.imagePullSecrets" .) }}
{{ . | trim }}
{{- end }}
{{- with $s.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  {{- toYaml $s.podSecurityContext | nindent 2 }}
{{- with $s.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
