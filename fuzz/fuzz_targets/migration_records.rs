//! What a move reads back or takes in: the source's durable move record, the
//! target's record of a VM taken in (both JSON on disk), and the handoff a
//! source sends in `Prepare` (JSON in a request from another node), through
//! the target's edge check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmscale_agent::migration::adopted::AdoptedRecord;
use vmscale_agent::migration::mover::MoveRecord;
use vmscale_agent::migration::target_node::Prepare;
use vmscale_proto::migration as pb;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 3 {
        0 => {
            if let Ok(r) = serde_json::from_slice::<MoveRecord>(rest) {
                let _ = r.spec.validate();
            }
        }
        1 => {
            if let Ok(r) = serde_json::from_slice::<AdoptedRecord>(rest) {
                let _ = r.spec.validate();
            }
        }
        _ => {
            let Ok(handoff_json) = String::from_utf8(rest.to_vec()) else { return };
            // The ids the request names beside the handoff: read from the
            // handoff itself when it has them, so the check goes deeper.
            let v: serde_json::Value = serde_json::from_str(&handoff_json).unwrap_or_default();
            let order_id = v.pointer("/handoff/order_id").and_then(serde_json::Value::as_u64).unwrap_or(0);
            let vm_id = v.pointer("/vm/id").and_then(serde_json::Value::as_str).unwrap_or("").to_owned();
            let _ = Prepare::try_from(pb::PrepareRequest { order_id, vm_id, handoff_json });
        }
    }
});
