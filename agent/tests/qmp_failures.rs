//! A real QEMU that errs, hangs, dies or is busy: every case is a typed
//! error in bounded time, never a panic or a hang.
#![allow(clippy::unwrap_used)]

mod qmp_support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmscale_agent::qmp::{
    ClientConfig, Endpoint, Error, EventKind, Hotplug, HotplugConfig, QmpClient, QmpVm,
};

use qmp_support::{client_config, TestQemu, MIB};

macro_rules! qemu {
    ($name:expr) => {
        qemu!($name, |_| {})
    };
    ($name:expr, $shape:expr) => {
        match TestQemu::start($name, $shape).await {
            Some(q) => q,
            None => return,
        }
    };
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn qemu_error_replies_are_typed() {
    let q = qemu!("qemu_error_replies_are_typed");
    let client = q.client().await;
    let err = client
        .execute::<Value>("device_add", Some(json!({"driver": "no-such-device", "id": "x"})))
        .await
        .unwrap_err();
    let Error::Qemu { command, class, desc } = &err else {
        panic!("expected a qemu error, got {err:#}");
    };
    assert_eq!((command.as_str(), class.as_str()), ("device_add", "GenericError"));
    assert!(desc.contains("no-such-device"), "{desc}");

    let vm = QmpVm::new(client.clone(), HotplugConfig::default());
    vm.plug_vcpu().await.unwrap();
    // The same id twice.
    let args = json!({"driver": "qemu64-x86_64-cpu", "id": "vmscale-cpu1",
                      "socket-id": 0, "core-id": 5, "thread-id": 0});
    let err = client.execute::<Value>("device_add", Some(args)).await.unwrap_err();
    assert!(err.to_string().contains("Duplicate device ID"), "{err}");
    let err = client.execute::<Value>("no-such-command", None).await.unwrap_err();
    assert_eq!(err.qemu_class(), Some("CommandNotFound"));
    // The connection is still good after errors.
    assert_eq!(vm.read_size().await.unwrap().vcpus_present, 2);
}

#[tokio::test]
async fn qemu_killed_during_an_unplug_wait_is_disconnected_not_a_hang() {
    let q = qemu!("qemu_killed_during_an_unplug_wait");
    let mut q = q;
    let config = HotplugConfig { unplug_timeout: Duration::from_secs(60), ..HotplugConfig::default() };
    let vm = QmpVm::new(q.client().await, config);
    vm.plug_dimm(256 * MIB).await.unwrap();
    let started = Instant::now();
    let (result, ()) = tokio::join!(vm.unplug_dimm(), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        q.qemu.kill().await.unwrap();
    });
    let err = result.unwrap_err();
    assert!(err.is_disconnected(), "{err:#}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = vm.read_size().await.unwrap_err();
    assert!(err.is_disconnected(), "{err:#}");
    assert!(!vm.client().is_connected());
}

#[tokio::test]
async fn a_frozen_qemu_times_out_and_dying_frees_the_waiters() {
    let q = qemu!("a_frozen_qemu");
    let mut q = q;
    let client = q.client().await;
    let pid = q.qemu.pid().unwrap();
    signal(pid, "-STOP");
    let err = client
        .execute_with_timeout::<Value>("query-status", None, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:#}");

    // Commands in flight when QEMU dies fail at once, long before their timeout.
    let started = Instant::now();
    let waiting = client.execute_with_timeout::<Value>("query-status", None, Duration::from_secs(60));
    let (result, ()) = tokio::join!(waiting, async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        q.qemu.kill().await.unwrap();
    });
    assert!(result.unwrap_err().is_disconnected());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn events_arrive_and_the_stream_ends_with_qemu() {
    let q = qemu!("events_arrive");
    let client = q.client().await;
    let mut events = client.events();
    client.execute::<Value>("stop", None).await.unwrap();
    client.execute::<Value>("cont", None).await.unwrap();
    // `quit` may close the socket before or after its reply arrives.
    let _ = client.execute::<Value>("quit", None).await;
    let mut names = Vec::new();
    let mut shutdown = None;
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
        if let EventKind::Shutdown { guest, reason } = event.kind() {
            shutdown = Some((guest, reason));
        }
        names.push(event.name);
    }
    assert_eq!(names, ["STOP", "RESUME", "SHUTDOWN"]);
    assert_eq!(shutdown, Some((false, Some("host-qmp-quit".to_string()))));
    assert!(!client.is_connected());
}

/// QEMU serves one client per QMP socket: a second one is accepted by the
/// kernel but gets no greeting while the first stays.
#[tokio::test]
async fn a_second_client_waits_for_the_first_to_leave() {
    let q = qemu!("a_second_client");
    let first = q.client().await;
    let short = ClientConfig { handshake_timeout: Duration::from_millis(300), ..client_config() };
    let err = QmpClient::connect(q.qemu.endpoint(), short).await.unwrap_err();
    assert!(matches!(err, Error::Handshake { .. }), "{err:#}");
    drop(first);
    // QEMU first drains the abandoned connection; retry briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let second = loop {
        match QmpClient::connect(q.qemu.endpoint(), client_config()).await {
            Ok(client) => break client,
            Err(e) if Instant::now() < deadline => eprintln!("retrying: {e:#}"),
            Err(e) => panic!("second client: {e:#}"),
        }
    };
    second.execute::<Value>("query-status", None).await.unwrap();
}

#[tokio::test]
async fn qmp_over_tcp() {
    let q = qemu!("qmp_over_tcp", |o| o.tcp = true);
    assert!(matches!(q.qemu.endpoint(), Endpoint::Tcp(_)));
    let vm = q.vm().await;
    vm.plug_vcpu().await.unwrap();
    assert_eq!(vm.read_size().await.unwrap().vcpus_present, 2);
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error() {
    let dir = qmp_support::TempDir::new();
    let endpoint = Endpoint::Unix(dir.path().join("absent.sock"));
    let err = QmpClient::connect(&endpoint, client_config()).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:#}");
}
