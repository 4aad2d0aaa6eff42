//! The allocator's edge: any bytes as an agent's message, each body through
//! the conversion the session runs it through (`allocator/src/convert.rs`).
//! A conversion may refuse; it must never panic or overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use vmscale_allocator::convert;
use vmscale_allocator::core::contention::ContentionReport;
use vmscale_allocator::core::vm::VmRegistration;
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = pb::AgentMessage::decode(data) else { return };
    match m.body {
        Some(Body::Hello(h)) => {
            // The bound the allocator's default config sets.
            let _ = convert::hello(h, 1024);
        }
        Some(Body::AddVm(a)) => {
            if let Some(vm) = a.vm {
                let _ = VmRegistration::try_from(vm);
            }
        }
        Some(Body::Reserve(r)) => {
            let _ = convert::resources(r.target, "target");
        }
        Some(Body::Release(r)) => {
            let _ = convert::resources(r.new_size, "new_size");
        }
        Some(Body::MigrationStatus(s)) => {
            let _ = convert::phase(s.phase);
        }
        Some(Body::NodeContention(c)) => {
            let _ = ContentionReport::try_from(c);
        }
        Some(Body::RemoveVm(_) | Body::Ping(_)) | None => {}
    }
});
