//! Carrying out the core's decisions: one action at a time in a task of its
//! own (so events keep flowing while QEMU works), the `cpu.max` quota, and
//! the VM's registration on a new allocator session. Nothing here decides;
//! each result goes back to the core as an input.

use crate::core::policy::{vcpus_for, Size};
use crate::core::vm::{Action, Input, VmCore};
use crate::links::allocator::{registration, AllocatorSession, Session};
use crate::links::informant::Link;
use crate::qmp::{Hypervisor, VcpuThreads};
use crate::vm_loop::hotplug::{self, size_of};
use crate::vms::VmSpec;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};
use vmscale_allocator_client::ClientError;
use vmscale_common::error::chain;
use vmscale_proto::allocator as apb;
use vmscale_proto::allocator::agent_message::Body;

/// A finished action: the core's input from it, how long it took, and why
/// it failed, if it did.
#[derive(Debug)]
pub struct Done {
    pub action: Action,
    pub input: Input,
    pub took: Duration,
    pub error: Option<String>,
}

/// One action's execution context: a snapshot taken when it started.
pub struct Exec {
    pub vm: String,
    pub spec: VmSpec,
    pub hv: Arc<dyn Hypervisor>,
    pub session: Session,
    pub guest: Link,
    pub op_timeout: Duration,
}

/// A failed action: QEMU's size after it when known, and the reason.
type Failure = (Option<Size>, String);

impl Exec {
    /// Runs `action` within the operation timeout.
    pub async fn run(self, action: Action) -> Done {
        let started = Instant::now();
        let r = tokio::time::timeout(self.op_timeout, self.act(action)).await;
        let (input, error) = match r {
            Ok(Ok(input)) => (input, None),
            Ok(Err((size, reason))) => (Input::Failed { size }, Some(reason)),
            Err(_) => (Input::Failed { size: None }, Some(format!("timed out after {:?}", self.op_timeout))),
        };
        Done { action, input, took: started.elapsed(), error }
    }

    async fn act(&self, action: Action) -> Result<Input, Failure> {
        match action {
            Action::RequestPermit { target } => {
                let p = self.session()?.reserve(&self.vm, target).await.map_err(|e| (None, chain(&e)))?;
                let got = p.permitted.unwrap_or_default();
                Ok(Input::Permit { permitted: Size::new(got.milli_cpu, got.memory_bytes) })
            }
            Action::Release { size } => {
                self.session()?.release(&self.vm, size).await.map_err(|e| (None, chain(&e)))?;
                Ok(Input::Released)
            }
            Action::Plug { target } => {
                let v = hotplug::plug(self.hv.as_ref(), &self.spec, target, self.op_timeout)
                    .await
                    .map_err(|e| (e.size, e.reason))?;
                Ok(Input::Plugged { size: size_of(&v) })
            }
            Action::Unplug { target } => {
                let v = hotplug::unplug(self.hv.as_ref(), &self.spec, target, self.op_timeout)
                    .await
                    .map_err(|e| (e.size, e.reason))?;
                Ok(Input::Unplugged { size: size_of(&v) })
            }
            Action::NotifyUpscale { size } => {
                let g = self.guest()?;
                g.notify_upscale(vcpus_for(size.milli_cpu), size.memory_bytes)
                    .await
                    .map_err(|e| (None, e.to_string()))?;
                Ok(Input::UpscaleConfirmed)
            }
            Action::AskDownscale { target, vcpus } => {
                let r = self.guest()?.ask_downscale(vcpus, target.memory_bytes).await;
                let r = r.map_err(|e| (None, e.to_string()))?;
                if !r.approved {
                    info!(vm = %self.vm, reason = %r.reason, "informant denied a downscale");
                }
                Ok(Input::DownscaleAnswer { approved: r.approved })
            }
        }
    }

    fn session(&self) -> Result<&Arc<dyn AllocatorSession>, Failure> {
        self.session.as_ref().ok_or_else(|| (None, "no allocator session".to_owned()))
    }

    fn guest(&self) -> Result<&Arc<dyn crate::links::informant::GuestLink>, Failure> {
        self.guest.as_ref().ok_or_else(|| (None, "no informant connection".to_owned()))
    }
}

/// Sets the QEMU process's CPU quota for `milli_cpu`; whether it worked. A
/// failure leaves the VM as it is and is logged: the quota refines the VM's
/// size, it is no condition of scaling.
pub async fn apply_cpu_max(
    hv: &dyn VcpuThreads,
    proc_root: &std::path::Path,
    scope: &crate::vm_loop::cpu_max::Scope,
    vm: &str,
    milli_cpu: u64,
) -> bool {
    match crate::vm_loop::cpu_max::apply(hv, proc_root, scope, milli_cpu).await {
        Ok(a) => {
            info!(%vm, milli_cpu, pid = a.pid, cgroup = %a.cgroup.dir.display(), limit = ?a.limit, "QEMU CPU quota set");
            true
        }
        Err(e) => {
            warn!(%vm, milli_cpu, "cannot set QEMU's CPU quota: {}", chain(&e));
            false
        }
    }
}

/// Puts the VM in the ledger of a new session (it may have come after the
/// session's hello).
pub async fn add_vm(s: &dyn AllocatorSession, vm: &str, core: &VmCore) {
    let body = Body::AddVm(apb::AddVm { vm: Some(registration(vm, &super::status::registered(core))) });
    match s.call(body).await {
        Ok(_) => {}
        // Registered by the hello already: nothing to do.
        Err(ClientError::Request { code: tonic::Code::AlreadyExists, .. }) => {}
        Err(e) => warn!(%vm, "cannot add the VM to the allocator's ledger: {}", chain(&e)),
    }
}
