//! The agent's one session with the allocator, kept alive: it reconnects with
//! backoff and jitter and, on every new session, registers the node with each
//! VM's current size and last permit (rule 4: the allocator rebuilds from us).
//! VM loops see the live session (or its absence) on a `watch` channel and
//! send their requests straight on it, so many VMs' requests are pipelined.

use crate::core::policy::{Cu, Size};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vmscale_allocator_client::{channel_with, ClientError, SessionClient};
use vmscale_common::backoff::{clock_seed, Backoff};
use vmscale_common::error::Chain;
use vmscale_common::sync::lock;
use vmscale_common::tls::{Identity, Tls, TlsFiles};
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_message::Body as Reply;

/// What the allocator must hear about one VM when the node registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    pub current: Size,
    pub permitted: Size,
    pub cu: Cu,
    pub min_cus: u32,
    pub max_cus: u32,
}

/// A move this node is the source of: (order id, target node).
pub type Moving = (u64, String);

/// Every VM of the node as its loop last saw it, and the moves under way
/// from this node; the source of each hello (a move not reported there is
/// failed by the allocator).
#[derive(Debug, Default)]
pub struct Registry {
    vms: Mutex<BTreeMap<String, Registered>>,
    moving: Mutex<BTreeMap<String, Moving>>,
}

impl Registry {
    pub fn set(&self, vm: &str, r: Registered) {
        lock(&self.vms).insert(vm.to_owned(), r);
    }

    pub fn remove(&self, vm: &str) {
        lock(&self.vms).remove(vm);
        self.set_moving(vm, None);
    }

    pub fn snapshot(&self) -> Vec<(String, Registered)> {
        lock(&self.vms).iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Marks (or clears) a move of `vm` away from this node.
    pub fn set_moving(&self, vm: &str, m: Option<Moving>) {
        let mut moving = lock(&self.moving);
        match m {
            Some(m) => moving.insert(vm.to_owned(), m),
            None => moving.remove(vm),
        };
    }

    pub fn moving(&self, vm: &str) -> Option<Moving> {
        lock(&self.moving).get(vm).cloned()
    }

    /// Each VM's registration as the hello carries it.
    pub fn registrations(&self) -> Vec<pb::VmRegistration> {
        self.snapshot()
            .iter()
            .map(|(id, r)| {
                let mut reg = registration(id, r);
                reg.migration = self
                    .moving(id)
                    .map(|(order_id, target_node)| pb::MigrationInProgress { order_id, target_node });
                reg
            })
            .collect()
    }
}

pub fn res(s: Size) -> Option<pb::Resources> {
    Some(pb::Resources { milli_cpu: s.milli_cpu, memory_bytes: s.memory_bytes })
}

pub fn registration(id: &str, r: &Registered) -> pb::VmRegistration {
    let cu = Size::new(r.cu.milli_cpu, r.cu.memory_bytes);
    pb::VmRegistration {
        vm_id: id.to_owned(),
        current: res(r.current),
        last_permit: res(r.permitted),
        bounds: Some(pb::Bounds {
            min: res(Size::of_cus(r.min_cus, r.cu).min(r.current)),
            max: res(Size::of_cus(r.max_cus, r.cu).max(r.permitted).max(cu)),
        }),
        compute_unit: res(cu),
        migration: None,
    }
}

/// Settings of the link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `https://HOST:PORT` (with `tls`) or `http://HOST:PORT` of the allocator.
    pub addr: String,
    /// This node's certificate files: read again for every new session, so
    /// a renewed certificate is presented from the next reconnect on; the
    /// allocator's certificate must be `allocator.vmscale`. None: plain text.
    pub tls: Option<TlsFiles>,
    pub node: String,
    pub capacity: Size,
    /// This agent's migration endpoint for other agents; empty: it takes no
    /// VMs in.
    pub migration_endpoint: String,
    pub retry_base: Duration,
    pub retry_max: Duration,
}

/// The allocator session as the node, the VM loops and the mover use it: one
/// request, one answer. A trait so that their shells can be unit-tested
/// against [`fake::ScriptedSession`] instead of a gRPC server.
#[async_trait::async_trait]
pub trait AllocatorSession: Send + Sync + std::fmt::Debug {
    /// Sends one request and waits for its answer; a `RequestError` answer
    /// is an error.
    async fn call(&self, body: Body) -> Result<Reply, ClientError>;

    /// Asks for a reservation of `target`; the answer's permit may be less.
    async fn reserve(&self, vm: &str, target: Size) -> Result<pb::Permit, ClientError> {
        let body = Body::Reserve(pb::Reserve { vm_id: vm.to_owned(), target: res(target) });
        match self.call(body).await? {
            Reply::Permit(p) => Ok(p),
            other => Err(ClientError::Unexpected(format!("{other:?} instead of a permit"))),
        }
    }

    /// Tells of a decrease already carried out.
    async fn release(&self, vm: &str, new_size: Size) -> Result<(), ClientError> {
        let body = Body::Release(pb::Release { vm_id: vm.to_owned(), new_size: res(new_size) });
        self.call(body).await.map(|_| ())
    }
}

#[async_trait::async_trait]
impl AllocatorSession for SessionClient {
    async fn call(&self, body: Body) -> Result<Reply, ClientError> {
        SessionClient::call(self, body).await
    }
}

/// The live session, if any.
pub type Session = Option<Arc<dyn AllocatorSession>>;

/// Keeps a session open until `cancel`; publishes it on `session_tx` and
/// forwards pushed messages (migration orders) to `pushed_tx`.
pub async fn run(
    cfg: LinkConfig,
    registry: Arc<Registry>,
    session_tx: watch::Sender<Session>,
    pushed_tx: mpsc::Sender<pb::AllocatorMessage>,
    cancel: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let opened = tokio::select! {
            () = cancel.cancelled() => return,
            r = open(&cfg, &registry) => r,
        };
        match opened {
            Ok(mut client) => {
                failures = 0;
                info!(allocator = %cfg.addr, session = client.welcome.session_id, "registered with the allocator");
                for r in &client.welcome.refused {
                    warn!(vm = %r.vm_id, code = r.code, "the allocator did not take this vm from the hello: {}", r.message);
                }
                let mut pushed = std::mem::replace(&mut client.pushed, mpsc::channel(1).1);
                let ended = Arc::clone(&client.ended);
                session_tx.send_replace(Some(Arc::new(client)));
                // Until the session ends: forward what the allocator pushes.
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => {
                            session_tx.send_replace(None);
                            return;
                        }
                        m = pushed.recv() => match m {
                            Some(m) => { let _ = pushed_tx.send(m).await; }
                            None => break,
                        }
                    }
                }
                let why = ended
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .map(|s| format!("{:?}: {}", s.code(), s.message()))
                    .unwrap_or_default();
                session_tx.send_replace(None);
                warn!(reason = %why, "allocator session ended; reconnecting");
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                warn!(allocator = %cfg.addr, failures, "cannot register with the allocator: {}", Chain(&e));
            }
        }
        let wait = backoff(&cfg, failures);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

async fn open(cfg: &LinkConfig, registry: &Registry) -> Result<SessionClient, ClientError> {
    let tls = cfg.tls.as_ref().map(Tls::load).transpose().map_err(ClientError::Tls)?;
    let ch = channel_with(&cfg.addr, tls.map(|t| t.client_config(&Identity::Allocator))).await?;
    let hello = pb::Hello {
        versions: Some(pb::VersionRange {
            min: *vmscale_proto::ALLOCATOR_PROTOCOL.start(),
            max: *vmscale_proto::ALLOCATOR_PROTOCOL.end(),
        }),
        node: cfg.node.clone(),
        capacity: res(cfg.capacity),
        vms: registry.registrations(),
        agent: format!("vmscale-agent {}", env!("CARGO_PKG_VERSION")),
        migration_endpoint: cfg.migration_endpoint.clone(),
    };
    SessionClient::open(ch, hello).await
}

/// The wait before the next attempt: exponential from `retry_base` (also
/// after a session that ended, `failures` = 0), with jitter from the clock so
/// that the agents of a restarted allocator don't all come back in the same
/// millisecond.
fn backoff(cfg: &LinkConfig, failures: u32) -> Duration {
    Backoff::new(cfg.retry_base, cfg.retry_max).jittered(failures.saturating_add(1), clock_seed())
}

/// A session that answers from a script, for the shells' unit tests.
#[cfg(test)]
pub mod fake {
    use super::*;

    type Answer = Box<dyn Fn(&Body) -> Result<Reply, ClientError> + Send + Sync>;

    /// Records every request and answers each with `answer`.
    pub struct ScriptedSession {
        pub calls: Mutex<Vec<Body>>,
        answer: Answer,
    }

    impl std::fmt::Debug for ScriptedSession {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ScriptedSession").field("calls", &self.calls).finish_non_exhaustive()
        }
    }

    impl ScriptedSession {
        pub fn new(
            answer: impl Fn(&Body) -> Result<Reply, ClientError> + Send + Sync + 'static,
        ) -> Arc<Self> {
            Arc::new(ScriptedSession { calls: Mutex::new(Vec::new()), answer: Box::new(answer) })
        }

        /// Grants every reservation in full and acknowledges everything else.
        pub fn granting() -> Arc<Self> {
            Self::new(|b| {
                Ok(match b {
                    Body::Reserve(r) => Reply::Permit(pb::Permit {
                        vm_id: r.vm_id.clone(),
                        permitted: r.target,
                        ..Default::default()
                    }),
                    _ => Reply::Ack(pb::Ack::default()),
                })
            })
        }

        pub fn calls(&self) -> Vec<Body> {
            lock(&self.calls).clone()
        }
    }

    #[async_trait::async_trait]
    impl AllocatorSession for ScriptedSession {
        async fn call(&self, body: Body) -> Result<Reply, ClientError> {
            let answer = (self.answer)(&body);
            lock(&self.calls).push(body);
            answer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CU: Cu = Cu { milli_cpu: 250, memory_bytes: 1 << 30 };

    #[test]
    fn registration_carries_size_permit_and_bounds() {
        let r = Registered {
            current: Size::of_cus(2, CU),
            permitted: Size::of_cus(3, CU),
            cu: CU,
            min_cus: 1,
            max_cus: 8,
        };
        let p = registration("vm", &r);
        assert_eq!(p.current, res(Size::of_cus(2, CU)));
        assert_eq!(p.last_permit, res(Size::of_cus(3, CU)));
        assert_eq!(p.bounds.unwrap().max, res(Size::of_cus(8, CU)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let cfg = LinkConfig {
            addr: String::new(),
            tls: None,
            node: String::new(),
            capacity: Size::default(),
            migration_endpoint: String::new(),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        };
        assert!(backoff(&cfg, 0) <= Duration::from_millis(100));
        assert!(backoff(&cfg, 0) >= Duration::from_millis(75));
        assert!(backoff(&cfg, 3) >= Duration::from_millis(600));
        assert!(backoff(&cfg, 30) <= Duration::from_secs(5));
    }
}
