//! Lines a QEMU monitor sends (`agent/src/qmp/wire.rs`). A QMP socket named by
//! a pod's annotation may be anyone's, so every line is hostile.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let _ = vmscale_agent::qmp::wire::parse_server_line(line);
});
