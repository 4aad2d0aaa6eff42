//! The paths a real QEMU without a guest cannot show: a guest that releases
//! devices (DEVICE_DELETED), a virtio-mem driver that follows requests, an
//! event that comes too late. A tiny QEMU model on an in-memory pipe answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::*;
use crate::qmp::client::{ClientConfig, QmpClient};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;

/// Memory devices and backends of the model, plus how its "guest" behaves.
#[derive(Default)]
struct Model {
    /// (device id, backend id, size)
    dimms: Vec<(String, String, u64)>,
    backends: Vec<(String, u64)>,
    /// The guest releases a device this long after `device_del`; `None`: never.
    release_after: Option<Duration>,
    virtio_requested: u64,
    virtio_size: u64,
    /// The virtio-mem driver follows requests (and says so with an event).
    virtio_driver: bool,
    commands: Vec<String>,
}

impl Model {
    /// The reply, and events to send after it (with their delay).
    fn answer(&mut self, command: &str, args: &Value) -> (Value, Vec<(Duration, Value)>) {
        self.commands.push(command.to_string());
        let ok = json!({"return": {}});
        match command {
            "query-memory-devices" => {
                let mut devices: Vec<Value> = self
                    .dimms
                    .iter()
                    .enumerate()
                    .map(|(slot, (id, backend, size))| {
                        json!({"type": "dimm", "data": {"id": id, "size": size, "slot": slot,
                            "node": 0, "memdev": format!("/objects/{backend}"),
                            "hotplugged": true, "hotpluggable": true}})
                    })
                    .collect();
                devices.push(json!({"type": "virtio-mem", "data": {"id": "vm0",
                    "size": self.virtio_size, "requested-size": self.virtio_requested,
                    "max-size": 1u64 << 31, "block-size": 2u64 << 20, "node": 0,
                    "memdev": "/objects/vmem0"}}));
                (json!({ "return": devices }), vec![])
            }
            "query-memdev" => {
                let mut all: Vec<Value> =
                    self.backends.iter().map(|(id, size)| json!({"id": id, "size": size})).collect();
                all.push(json!({"id": "vmem0", "size": 1u64 << 31}));
                (json!({ "return": all }), vec![])
            }
            "object-add" => {
                let id = args["id"].as_str().unwrap_or_default().to_string();
                self.backends.push((id, args["size"].as_u64().unwrap_or(0)));
                (ok, vec![])
            }
            "device_add" => {
                let (id, backend) = (&args["id"], &args["memdev"]);
                let size = self.backends.iter().find(|(b, _)| b == backend).map_or(0, |(_, s)| *s);
                let pair = (id.as_str().unwrap_or_default(), backend.as_str().unwrap_or_default());
                self.dimms.push((pair.0.into(), pair.1.into(), size));
                (ok, vec![])
            }
            "device_del" => {
                let id = args["id"].as_str().unwrap_or_default().to_string();
                let Some(after) = self.release_after else {
                    return (ok, vec![]);
                };
                // The guest acts at once in this model; the event is what lags.
                self.dimms.retain(|(d, _, _)| *d != id);
                let event = json!({"event": "DEVICE_DELETED",
                    "data": {"device": id, "path": format!("/machine/peripheral/{id}")}});
                (ok, vec![(after, event)])
            }
            "object-del" => {
                self.backends.retain(|(b, _)| b != &args["id"]);
                (ok, vec![])
            }
            "qom-set" => {
                self.virtio_requested = args["value"].as_u64().unwrap_or(0);
                if !self.virtio_driver {
                    return (ok, vec![]);
                }
                self.virtio_size = self.virtio_requested;
                let event = json!({"event": "MEMORY_DEVICE_SIZE_CHANGE",
                    "data": {"id": "vm0", "size": self.virtio_size}});
                (ok, vec![(Duration::from_millis(5), event)])
            }
            _ => (json!({"error": {"class": "CommandNotFound", "desc": command}}), vec![]),
        }
    }
}

/// A `QmpVm` talking to the model.
async fn vm_with(model: Model, config: HotplugConfig) -> (QmpVm, Arc<Mutex<Model>>) {
    let model = Arc::new(Mutex::new(model));
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let served = model.clone();
    tokio::spawn(async move {
        let (read, write) = tokio::io::split(theirs);
        let write = Arc::new(tokio::sync::Mutex::new(write));
        let send = |w: Arc<tokio::sync::Mutex<_>>, v: Value| async move {
            let mut line = v.to_string().into_bytes();
            line.extend_from_slice(b"\r\n");
            let _ = AsyncWriteExt::write_all(&mut *w.lock().await, &line).await;
        };
        send(write.clone(), serde_json::from_str(GREETING).expect("greeting")).await;
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let request: Value = serde_json::from_str(&line).expect("json");
            let command = request["execute"].as_str().unwrap_or_default();
            let (mut reply, events) = if command == "qmp_capabilities" {
                (json!({"return": {}}), vec![])
            } else {
                served.lock().expect("model").answer(command, &request["arguments"])
            };
            reply["id"] = request["id"].clone();
            send(write.clone(), reply).await;
            for (delay, event) in events {
                let w = write.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    send(w, event).await;
                });
            }
        }
    });
    let client =
        QmpClient::handshake(ours, "model".into(), ClientConfig::default()).await.expect("handshake");
    (QmpVm::new(client, config), model)
}

fn config(unplug_ms: u64) -> HotplugConfig {
    HotplugConfig {
        unplug_timeout: Duration::from_millis(unplug_ms),
        virtio_mem_poll: Duration::from_millis(20),
        ..HotplugConfig::default()
    }
}

fn commands(model: &Arc<Mutex<Model>>) -> Vec<String> {
    std::mem::take(&mut model.lock().expect("model").commands)
}

#[tokio::test]
async fn a_released_dimm_loses_its_backend_after_the_event() {
    let model = Model { release_after: Some(Duration::from_millis(10)), ..Model::default() };
    let (vm, model) = vm_with(model, config(2000)).await;
    let plugged = vm.plug_dimm(256 << 20).await.expect("plug");
    commands(&model);
    let unplugged = vm.unplug_dimm().await.expect("unplug");
    assert_eq!(unplugged, plugged);
    assert_eq!(commands(&model), ["query-memory-devices", "query-memdev", "device_del", "object-del"]);
    let m = model.lock().expect("model");
    assert!(m.dimms.is_empty() && m.backends.is_empty());
    assert!(vm.pending_unplugs().is_empty());
}

#[tokio::test]
async fn an_event_after_the_timeout_leaves_a_backend_the_next_plug_reuses() {
    let model = Model { release_after: Some(Duration::from_millis(200)), ..Model::default() };
    let (vm, model) = vm_with(model, config(50)).await;
    vm.plug_dimm(256 << 20).await.expect("plug");
    // The model's guest already dropped the DIMM, so the check after the
    // missing event finds it gone: the unplug succeeds without the event.
    vm.unplug_dimm().await.expect("gone without the event");

    // Now a DIMM whose device stays, then a backend left without its device.
    model.lock().expect("model").release_after = None;
    vm.plug_dimm(256 << 20).await.expect("plug");
    let err = vm.unplug_dimm().await.expect_err("no release");
    assert!(matches!(err, Error::UnplugTimeout { .. }));
    assert_eq!(vm.pending_unplugs(), ["vmscale-dimm0"]);
    {
        // The guest finally lets go, after we stopped waiting.
        let mut m = model.lock().expect("model");
        m.dimms.clear();
        m.commands.clear();
    }
    let again = vm.plug_dimm(256 << 20).await.expect("plug reuses");
    assert_eq!(again.backend, "vmscale-dimm0-mem");
    // The note of the pending unplug went with the device it was about.
    assert!(vm.pending_unplugs().is_empty());
    let seen = commands(&model);
    assert!(!seen.contains(&"object-add".to_string()), "{seen:?}");
    assert!(!seen.contains(&"object-del".to_string()), "{seen:?}");
}

#[tokio::test]
async fn virtio_mem_wait_ends_on_the_size_change() {
    let model = Model { virtio_driver: true, ..Model::default() };
    let (vm, _model) = vm_with(model, config(100)).await;
    vm.set_virtio_mem_size(512 << 20).await.expect("resize");
    let plugged = vm.wait_virtio_mem_plugged(Duration::from_secs(2)).await.expect("driver follows");
    assert_eq!(plugged, 512 << 20);
    let size = vm.read_size().await;
    // The model has no CPUs and no summary: read_size reports QEMU's error.
    assert_eq!(size.expect_err("model lacks queries").qemu_class(), Some("CommandNotFound"));
}

#[tokio::test]
async fn virtio_mem_wait_times_out_without_a_driver() {
    let (vm, _model) = vm_with(Model::default(), config(100)).await;
    vm.set_virtio_mem_size(256 << 20).await.expect("resize");
    let err = vm.wait_virtio_mem_plugged(Duration::from_millis(100)).await.expect_err("no driver");
    assert!(matches!(err, Error::VirtioMemTimeout { requested_bytes: 268_435_456, plugged_bytes: 0, .. }));
}
