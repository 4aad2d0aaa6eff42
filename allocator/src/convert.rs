//! The edge between wire types and the core's domain types. Everything that
//! comes off the wire is validated here, with errors that name the field.

use crate::core::contention::{ContentionReport, VmContention};
use crate::core::error::{CoreError, ErrorKind};
use crate::core::ledger::{Grant, Outcome};
use crate::core::migration::{Order, OrderState};
use crate::core::names::{cut, MAX_ID_LEN, MAX_NODE_LEN};
use crate::core::units::{ComputeUnit, Resources};
use crate::core::vm::{Bounds, VmRegistration};
use crate::core::{NodeRegistration, Reservation, VmRefusal};
use vmscale_proto::allocator as pb;

/// A message that could not be turned into a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdgeError {
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl EdgeError {
    pub fn code(&self) -> tonic::Code {
        match self {
            EdgeError::Missing(_) => tonic::Code::InvalidArgument,
            EdgeError::Core(e) => code_of(e),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            EdgeError::Missing(_) => "missing_field",
            EdgeError::Core(e) => e.label(),
        }
    }
}

pub fn code_of(e: &CoreError) -> tonic::Code {
    match e.kind() {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
        ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
    }
}

pub fn status_of(e: &EdgeError) -> tonic::Status {
    tonic::Status::new(e.code(), e.to_string())
}

pub fn resources(r: Option<pb::Resources>, field: &'static str) -> Result<Resources, EdgeError> {
    let r = r.ok_or(EdgeError::Missing(field))?;
    Ok(Resources::new(r.milli_cpu, r.memory_bytes).checked(field).map_err(CoreError::from)?)
}

/// Like [`resources`], but an absent value means zero (e.g. no permit yet).
fn resources_or_zero(r: Option<pb::Resources>, field: &'static str) -> Result<Resources, EdgeError> {
    match r {
        None => Ok(Resources::ZERO),
        some => resources(some, field),
    }
}

pub fn to_pb(r: Resources) -> pb::Resources {
    pb::Resources { milli_cpu: r.milli_cpu, memory_bytes: r.memory_bytes }
}

impl TryFrom<pb::VmRegistration> for VmRegistration {
    type Error = EdgeError;

    fn try_from(v: pb::VmRegistration) -> Result<Self, EdgeError> {
        let b = v.bounds.ok_or(EdgeError::Missing("vm.bounds"))?;
        let bounds = Bounds::new(resources(b.min, "vm.bounds.min")?, resources(b.max, "vm.bounds.max")?)?;
        let cu = ComputeUnit::new(resources(v.compute_unit, "vm.compute_unit")?)
            .map_err(|reason| CoreError::invalid(format!("compute unit of vm {:?}", v.vm_id), reason))?;
        let mut reg = VmRegistration::new(
            v.vm_id,
            resources(v.current, "vm.current")?,
            resources_or_zero(v.last_permit, "vm.last_permit")?,
            bounds,
            cu,
        )?;
        reg.migration = v.migration.map(|m| (m.order_id, m.target_node));
        Ok(reg)
    }
}

/// A hello into the node's registration. A VM whose values are bad is
/// refused alone (the core lists it in the welcome); only the node's own
/// fields fail the hello, and so does a hello of more than `max_vms` VMs,
/// before any of them is read.
pub fn hello(h: pb::Hello, max_vms: usize) -> Result<NodeRegistration, EdgeError> {
    if h.vms.len() > max_vms {
        let what = format!("the hello of node {:?} lists {} VMs", cut(&h.node, MAX_NODE_LEN), h.vms.len());
        return Err(CoreError::too_many(what, max_vms, "max_vms_per_node").into());
    }
    let mut vms = Vec::with_capacity(h.vms.len());
    let mut refused = Vec::new();
    for v in h.vms {
        let id = cut(&v.vm_id, MAX_ID_LEN).to_owned();
        match VmRegistration::try_from(v) {
            Ok(reg) => vms.push(reg),
            Err(EdgeError::Core(error)) => refused.push(VmRefusal { vm: id, error }),
            Err(e @ EdgeError::Missing(_)) => {
                refused.push(VmRefusal { vm: id, error: CoreError::invalid("vm", e.to_string()) })
            }
        }
    }
    Ok(NodeRegistration {
        node: h.node,
        capacity: resources(h.capacity, "hello.capacity")?,
        vms,
        migration_endpoint: h.migration_endpoint,
        refused,
    })
}

/// One entry of the welcome's `refused`.
pub fn refusal(r: &VmRefusal) -> pb::VmRefusal {
    pb::VmRefusal { vm_id: r.vm.clone(), code: code_of(&r.error) as i32, message: r.error.to_string() }
}

impl TryFrom<pb::NodeContention> for ContentionReport {
    type Error = EdgeError;

    fn try_from(c: pb::NodeContention) -> Result<Self, EdgeError> {
        let vms = c
            .vms
            .into_iter()
            .map(|v| {
                let figures = VmContention {
                    p50_us: v.p50_us,
                    p99_us: v.p99_us,
                    mean_us: v.mean_us,
                    max_us: v.max_us,
                    samples: v.samples,
                };
                (v.vm_id, figures)
            })
            .collect();
        Ok(ContentionReport::new(c.interval_ms, vms)?)
    }
}

/// Only the phases an agent may report.
pub fn phase(p: i32) -> Result<OrderState, EdgeError> {
    use pb::migration_status::Phase;
    match Phase::try_from(p) {
        Ok(Phase::Started) => Ok(OrderState::Started),
        Ok(Phase::Completed) => Ok(OrderState::Completed),
        Ok(Phase::Failed) => Ok(OrderState::Failed),
        _ => Err(CoreError::invalid(
            "migration_status.phase",
            format!("{p} is not one of STARTED, COMPLETED, FAILED"),
        )
        .into()),
    }
}

pub fn permit(vm: String, g: &Grant) -> pb::Permit {
    use pb::permit::Outcome as P;
    let (outcome, reason) = match g.outcome {
        Outcome::Granted => (P::Granted, String::new()),
        Outcome::Partial => {
            (P::Partial, format!("node has room for {} of {} compute units", g.granted_cus, g.requested_cus))
        }
        Outcome::Denied => {
            (P::Denied, format!("node has no room for any of {} compute units", g.requested_cus))
        }
    };
    pb::Permit {
        vm_id: vm,
        permitted: Some(to_pb(g.permitted)),
        requested: Some(to_pb(g.requested)),
        outcome: outcome as i32,
        reason,
    }
}

pub fn reservation(r: &Reservation) -> pb::VmReservation {
    pb::VmReservation { vm_id: r.vm.clone(), reserved: Some(to_pb(r.reserved)), migrating: r.migrating }
}

/// `target_endpoint`: the target agent's migration endpoint, from its hello.
pub fn order(o: &Order, target_endpoint: &str) -> pb::MigrationOrder {
    pb::MigrationOrder {
        order_id: o.id,
        vm_id: o.vm.clone(),
        source_node: o.source.clone(),
        target_node: o.target.clone(),
        reserved: Some(to_pb(o.reserved)),
        target_endpoint: target_endpoint.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(c: u64, m: u64) -> Option<pb::Resources> {
        Some(pb::Resources { milli_cpu: c, memory_bytes: m })
    }

    fn vm() -> pb::VmRegistration {
        pb::VmRegistration {
            vm_id: "vm-1".into(),
            current: res(250, 1 << 30),
            last_permit: None,
            bounds: Some(pb::Bounds { min: res(250, 1 << 30), max: res(4000, 16 << 30) }),
            compute_unit: res(250, 1 << 30),
            migration: None,
        }
    }

    #[test]
    fn valid_registration_converts() {
        let r = VmRegistration::try_from(vm()).unwrap();
        assert_eq!(r.last_permit, Resources::ZERO);
        assert_eq!(r.reservation(), Resources::new(250, 1 << 30));
    }

    #[test]
    fn bad_registrations_name_the_problem() {
        type Mutation = fn(&mut pb::VmRegistration);
        let cases: Vec<(Mutation, &str)> = vec![
            (|v| v.bounds = None, "missing field vm.bounds"),
            (|v| v.current = None, "missing field vm.current"),
            (|v| v.compute_unit = res(0, 1 << 30), "zero dimension"),
            (|v| v.compute_unit = res(250, 0), "zero dimension"),
            (|v| v.current = res(u64::MAX, 0), "milli-vCPU"),
            (|v| v.vm_id = String::new(), "vm id"),
            (|v| v.bounds = Some(pb::Bounds { min: res(500, 1), max: res(250, 1) }), "min"),
        ];
        for (mutate, want) in cases {
            let mut v = vm();
            mutate(&mut v);
            let e = VmRegistration::try_from(v).unwrap_err();
            assert!(e.to_string().contains(want), "{e} should mention {want}");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
    }

    fn hello_of(vms: Vec<pb::VmRegistration>) -> pb::Hello {
        pb::Hello { node: "a".into(), capacity: res(8000, 32 << 30), vms, ..pb::Hello::default() }
    }

    #[test]
    fn a_bad_vm_in_a_hello_is_refused_alone() {
        let absurd = pb::VmRegistration { vm_id: "huge".into(), current: res(u64::MAX, 0), ..vm() };
        let nameless = pb::VmRegistration { vm_id: "x".repeat(10_000), bounds: None, ..vm() };
        let reg = hello(hello_of(vec![vm(), absurd, nameless]), 16).unwrap();
        assert_eq!(reg.vms.len(), 1);
        let refused: Vec<_> = reg.refused.iter().map(|r| (r.vm.len(), r.error.label())).collect();
        assert_eq!(refused, [(4, "absurd_amount"), (253, "invalid")], "ids are cut to 253 bytes");
        let p = refusal(&reg.refused[1]);
        assert_eq!(p.code, tonic::Code::InvalidArgument as i32);
        assert!(p.message.contains("missing field vm.bounds"), "{}", p.message);
    }

    #[test]
    fn a_hello_with_too_many_vms_is_refused_before_any_is_read() {
        let e = hello(hello_of(vec![pb::VmRegistration::default(); 1_000_000]), 1024).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.to_string().contains("lists 1000000 VMs") && e.to_string().contains("max_vms_per_node"),
            "{e}"
        );
        // The node's own fields still fail the whole hello.
        let e = hello(pb::Hello { capacity: None, ..hello_of(vec![]) }, 16).unwrap_err();
        assert_eq!(e, EdgeError::Missing("hello.capacity"));
    }

    #[test]
    fn phases() {
        assert!(phase(0).is_err());
        assert!(phase(99).is_err());
        assert_eq!(phase(2).unwrap(), OrderState::Completed);
    }
}
