//! The agent's edge towards a guest: any bytes as an informant's event,
//! through what the agent makes of it (`agent/src/links/informant.rs`).
//! The guest is not trusted: every kind number, size and clock is hostile.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use vmscale_agent::links::informant::{pressure_kind, to_guest_event};
use vmscale_proto::informant as pb;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = pb::Event::decode(data) {
        let _ = to_guest_event(&e);
        if let Some(pb::event::Body::Pressure(p)) = &e.body {
            // Every number is some kind, never a new one per number.
            let _ = pressure_kind(p.kind).name();
        }
    }
});
