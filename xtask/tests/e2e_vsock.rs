//! End to end over vsock, as the informant ships (`listen = "vsock:7072"`):
//! `cargo xtask e2e vsock` (see xtask/src/e2e/vsock.rs). The real agent
//! dials the real informant in a QEMU guest (TCG) through the guest's vsock
//! device (vhost-user-vsock with vhost-device-vsock here, installed when
//! missing); its link shakes hands, the informant sees the host as CID 2, and
//! a memory ramp gets memfd DIMMs the informant brings online, no OOM kill.

mod e2e_support;

#[test]
fn the_agent_reaches_the_informant_over_vsock_and_memory_is_plugged_and_onlined() {
    e2e_support::run_scenario("vsock");
}
