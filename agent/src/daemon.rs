//! The agent daemon: what `vmscale-agent` does once it has its config, as a
//! library function so that the binary stays a thin flag reader and tests
//! build the node the way the binary does. It runs until its token is
//! cancelled (the binary cancels it on SIGTERM or Ctrl-C).

use crate::config::{host_capacity, Config, ConfigError};
use crate::core::policy::Size;
use crate::links::allocator::LinkConfig;
use crate::node::{self, NodeConfig, NodeHandles};
use crate::vms::file::{FileError, FileSource};
use crate::vms::kube::status::{KubeStatusWriter, StatusReporter};
use crate::vms::kube::{KubeSource, KubeSourceConfig, KubeSourceError};
use crate::vms::VmSpec;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The host's `/proc` could not be read (the message names the file).
    #[error("{0}")]
    Capacity(String),
    #[error("cannot start the VM source")]
    VmFile(#[from] FileError),
    #[error("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")]
    Kube(#[source] kube::Error),
    #[error(transparent)]
    KubeSource(#[from] KubeSourceError),
    #[error("the [tls] files are not usable")]
    Tls(#[from] vmscale_common::tls::TlsError),
    #[error("cannot get this node's certificate")]
    NodeCert(#[from] crate::node_cert::NodeCertError),
    #[error("cannot listen for HTTP on {addr}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent described by `c` until `cancel`.
pub async fn run(c: Config, cancel: CancellationToken) -> Result<(), DaemonError> {
    c.validate()?;
    if c.insecure {
        vmscale_common::tls::warn_insecure("agent");
    }
    // In Kubernetes the node's certificate may come from the CSR API: it
    // must be there before the files are checked.
    if let Some(nc) = c.kubernetes.as_ref().and_then(|k| k.node_certificate.as_ref()) {
        let client = kube::Client::try_default().await.map_err(DaemonError::Kube)?;
        if !crate::node_cert::obtain_patiently(client.clone(), &c.node, nc, &cancel).await? {
            return Ok(());
        }
        tracing::info!(node = %c.node, "node certificate issued");
        tokio::spawn(crate::node_cert::renew(client, c.node.clone(), nc.clone(), cancel.clone()));
    }
    // Read again for every connection; checked once here so that a bad
    // file stops the agent at start, naming it.
    if let Some(files) = &c.tls {
        vmscale_common::tls::Tls::load(files)?;
    }
    let capacity = capacity(&c)?;
    let (vms, reporter) = start_vm_source(&c, &cancel).await?;
    let (session_tx, session_rx) = watch::channel(None);
    let handles = NodeHandles::new(session_rx, reporter);
    let http = tokio::net::TcpListener::bind(c.http_listen)
        .await
        .map_err(|source| DaemonError::Http { addr: c.http_listen, source })?;
    tokio::spawn(crate::http::serve(http, handles.clone(), cancel.clone()));
    tracing::info!(node = %c.node, allocator = %c.allocator, ?capacity, "agent starting");
    node::run(node_config(&c, capacity), vms, handles, session_tx, cancel).await;
    Ok(())
}

/// What this node offers the allocator: the configured capacity, or the
/// host's where the config leaves it at zero.
pub fn capacity(c: &Config) -> Result<Size, DaemonError> {
    let (host_cpu, host_mem) = host_capacity(&c.proc_root).map_err(DaemonError::Capacity)?;
    Ok(Size::new(
        if c.capacity_milli_cpu > 0 { c.capacity_milli_cpu } else { host_cpu },
        if c.capacity_memory_bytes > 0 { c.capacity_memory_bytes } else { host_mem },
    ))
}

/// The node supervisor's settings from the agent's config.
pub fn node_config(c: &Config, capacity: Size) -> NodeConfig {
    NodeConfig {
        link: LinkConfig {
            addr: c.allocator.clone(),
            tls: c.tls.clone(),
            node: c.node.clone(),
            capacity,
            migration_endpoint: c.migration.endpoint_for(c.tls.is_some()),
            retry_base: Duration::from_millis(c.allocator_retry_base_ms),
            retry_max: Duration::from_millis(c.allocator_retry_max_ms),
        },
        policy: c.policy.clone(),
        qmp: crate::qmp::ClientConfig {
            command_timeout: Duration::from_millis(c.qmp_timeout_ms),
            ..Default::default()
        },
        unplug_timeout: Duration::from_millis(c.unplug_timeout_ms),
        dimm_backend: c.dimm_backend,
        contention: c.contention.clone(),
        proc_root: c.proc_root.clone(),
        migration: c.migration.clone(),
        informants: crate::links::dial::TcpSecurity { tls: c.tls.clone(), insecure: c.insecure },
    }
}

/// The VMs to scale, from the VM file or (with a `kubernetes` section) the
/// pods bound to this node, whose status then gets the VMs' sizes.
async fn start_vm_source(
    c: &Config,
    cancel: &CancellationToken,
) -> Result<(watch::Receiver<Vec<VmSpec>>, Option<StatusReporter>), DaemonError> {
    let Some(k) = &c.kubernetes else {
        let interval = Duration::from_millis(c.vms_file_interval_ms);
        let vms = FileSource { path: c.vms_file.clone(), interval }.start(cancel.clone())?;
        return Ok((vms, None));
    };
    let client = kube::Client::try_default().await.map_err(DaemonError::Kube)?;
    let source = KubeSource {
        config: KubeSourceConfig {
            node_name: c.node.clone(),
            label_key: k.label_key.clone(),
            label_value: k.label_value.clone(),
            namespace: k.namespace.clone(),
            pod_socket_dir: k.pod_socket_dir.clone(),
        },
    };
    let out = source.start(client.clone(), cancel.clone())?;
    let writer = KubeStatusWriter::new(client);
    let reporter = StatusReporter::start(writer, out.pods.clone(), k.status.clone(), cancel.clone());
    Ok((out.vms, Some(reporter)))
}
