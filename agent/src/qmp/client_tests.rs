//! The client against a scripted QEMU on an in-memory pipe: id matching,
//! concurrency, events, errors, timeouts and a peer that goes away.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

/// The QEMU side of the pipe.
struct FakeQemu {
    lines: Lines<BufReader<tokio::io::ReadHalf<DuplexStream>>>,
    write: tokio::io::WriteHalf<DuplexStream>,
}

impl FakeQemu {
    async fn recv(&mut self) -> Value {
        let line = self.lines.next_line().await.expect("read").expect("a request line");
        serde_json::from_str(&line).expect("request is json")
    }

    async fn send(&mut self, message: Value) {
        let mut line = serde_json::to_vec(&message).expect("json");
        line.extend_from_slice(b"\r\n");
        self.write.write_all(&line).await.expect("write");
    }
}

fn config() -> ClientConfig {
    ClientConfig {
        handshake_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(2),
        event_capacity: 16,
    }
}

/// A connected client and the fake QEMU behind it, past the handshake.
async fn connected() -> (QmpClient, FakeQemu) {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (read, write) = tokio::io::split(theirs);
    let mut qemu = FakeQemu { lines: BufReader::new(read).lines(), write };
    let server = async {
        qemu.write.write_all(format!("{GREETING}\r\n").as_bytes()).await.expect("greet");
        let caps = qemu.recv().await;
        assert_eq!(caps["execute"], "qmp_capabilities");
        qemu.send(json!({"return": {}, "id": caps["id"]})).await;
    };
    let (client, ()) = tokio::join!(QmpClient::handshake(ours, "fake".into(), config()), server);
    (client.expect("handshake"), qemu)
}

#[tokio::test]
async fn handshake_keeps_the_greeting() {
    let (client, _qemu) = connected().await;
    assert_eq!(client.greeting().version.qemu.major, 7);
    assert!(client.is_connected());
}

#[tokio::test]
async fn concurrent_commands_are_matched_by_id_not_order() {
    let (client, mut qemu) = connected().await;
    let a = client.execute::<Value>("query-status", None);
    let b = client.execute::<Value>("query-memory-size-summary", None);
    let server = async {
        let first = qemu.recv().await;
        let second = qemu.recv().await;
        assert_ne!(first["id"], second["id"]);
        // Answer in reverse order, as an out-of-band capable QEMU may.
        for request in [&second, &first] {
            let name = request["execute"].clone();
            qemu.send(json!({"return": {"for": name}, "id": request["id"]})).await;
        }
    };
    let (a, b, ()) = tokio::join!(a, b, server);
    assert_eq!(a.expect("a")["for"], "query-status");
    assert_eq!(b.expect("b")["for"], "query-memory-size-summary");
}

#[tokio::test]
async fn qemu_errors_are_typed() {
    let (client, mut qemu) = connected().await;
    let call = client.execute::<Value>("device_add", Some(json!({"driver": "nope"})));
    let server = async {
        let request = qemu.recv().await;
        assert_eq!(request["arguments"]["driver"], "nope");
        qemu.send(json!({"id": request["id"], "error": {"class": "GenericError", "desc": "'nope' is not a valid device model name"}})).await;
    };
    let (result, ()) = tokio::join!(call, server);
    let err = result.expect_err("must fail");
    assert_eq!(err.qemu_class(), Some("GenericError"));
    assert!(err.to_string().contains("not a valid device model name"), "{err}");
}

#[tokio::test]
async fn events_reach_every_subscriber_between_replies() {
    let (client, mut qemu) = connected().await;
    let mut events_a = client.events();
    let mut events_b = client.events();
    let call = client.execute::<Value>("device_del", Some(json!({"id": "d0"})));
    let server = async {
        let request = qemu.recv().await;
        qemu.send(json!({"event": "DEVICE_DELETED", "data": {"device": "d0", "path": "/machine/peripheral/d0"}, "timestamp": {"seconds": 1, "microseconds": 0}})).await;
        qemu.send(json!({"return": {}, "id": request["id"]})).await;
    };
    let (result, ()) = tokio::join!(call, server);
    result.expect("device_del");
    for events in [&mut events_a, &mut events_b] {
        let event = events.recv().await.expect("event");
        assert!(event.deletes("d0"));
    }
}

#[tokio::test]
async fn a_decode_failure_names_the_command() {
    let (client, mut qemu) = connected().await;
    let call = client.execute::<u64>("query-status", None);
    let server = async {
        let request = qemu.recv().await;
        qemu.send(json!({"return": {"status": "running"}, "id": request["id"]})).await;
    };
    let (result, ()) = tokio::join!(call, server);
    assert!(matches!(result, Err(Error::Decode { ref command, .. }) if command == "query-status"));
}

#[tokio::test(start_paused = true)]
async fn a_silent_qemu_times_out_and_a_late_reply_is_dropped() {
    let (client, mut qemu) = connected().await;
    let err = client
        .execute_with_timeout::<Value>("query-status", None, Duration::from_millis(50))
        .await
        .expect_err("no reply");
    assert!(matches!(err, Error::Timeout { ref command, .. } if command == "query-status"));
    // The late reply must not be taken for the next command's.
    let late = qemu.recv().await;
    qemu.send(json!({"return": "late", "id": late["id"]})).await;
    let call = client.execute::<Value>("query-status", None);
    let server = async {
        let request = qemu.recv().await;
        qemu.send(json!({"return": "fresh", "id": request["id"]})).await;
    };
    let (result, ()) = tokio::join!(call, server);
    assert_eq!(result.expect("fresh"), json!("fresh"));
}

#[tokio::test]
async fn qemu_going_away_fails_waiting_and_later_commands() {
    let (client, mut qemu) = connected().await;
    let mut events = client.events();
    let call = client.execute::<Value>("query-status", None);
    let server = async move {
        let _ = qemu.recv().await;
        drop(qemu);
    };
    let (result, ()) = tokio::join!(call, server);
    assert!(result.expect_err("gone").is_disconnected());
    assert!(!client.is_connected());
    let again = client.execute::<Value>("query-status", None).await;
    assert!(again.expect_err("still gone").is_disconnected());
    assert!(matches!(events.recv().await, Err(tokio::sync::broadcast::error::RecvError::Closed)));
    assert!(matches!(client.events().recv().await, Err(tokio::sync::broadcast::error::RecvError::Closed)));
}

#[tokio::test]
async fn handshake_errors_are_typed() {
    // Nothing ever said: a second client while QEMU serves another one.
    let (ours, _theirs) = tokio::io::duplex(1024);
    let short = ClientConfig { handshake_timeout: Duration::from_millis(50), ..config() };
    let err = QmpClient::handshake(ours, "busy".into(), short.clone()).await.expect_err("no greeting");
    assert!(matches!(err, Error::Handshake { ref reason, .. } if reason.contains("no greeting")));

    // Something that is not QMP.
    let (ours, mut theirs) = tokio::io::duplex(1024);
    theirs.write_all(b"SSH-2.0-OpenSSH\r\n").await.expect("write");
    let err = QmpClient::handshake(ours, "ssh".into(), short.clone()).await.expect_err("not qmp");
    assert!(matches!(err, Error::Handshake { .. }), "{err}");

    // Closed right away.
    let (ours, theirs) = tokio::io::duplex(1024);
    drop(theirs);
    let err = QmpClient::handshake(ours, "closed".into(), short).await.expect_err("closed");
    assert!(matches!(err, Error::Handshake { ref reason, .. } if reason.contains("closed")));
}

#[tokio::test]
async fn malformed_lines_are_skipped() {
    let (client, mut qemu) = connected().await;
    let call = client.execute::<Value>("query-status", None);
    let server = async {
        let request = qemu.recv().await;
        qemu.write.write_all(b"garbage\r\n\r\n").await.expect("write");
        qemu.send(json!({"return": 1, "id": request["id"]})).await;
    };
    let (result, ()) = tokio::join!(call, server);
    assert_eq!(result.expect("reply after garbage"), json!(1));
}

#[test]
fn endpoints_parse_from_config_strings() {
    assert_eq!(
        "tcp:127.0.0.1:4444".parse::<Endpoint>(),
        Ok(Endpoint::Tcp("127.0.0.1:4444".parse().expect("addr")))
    );
    assert_eq!(
        "/run/vmscale/pg-1.qmp".parse::<Endpoint>(),
        Ok(Endpoint::Unix("/run/vmscale/pg-1.qmp".into()))
    );
    assert_eq!("unix:/run/q.sock".parse::<Endpoint>(), Ok(Endpoint::Unix("/run/q.sock".into())));
    assert!("tcp:localhost".parse::<Endpoint>().is_err());
    assert!("".parse::<Endpoint>().is_err());
    let endpoint = Endpoint::Tcp("127.0.0.1:1".parse().expect("addr"));
    assert_eq!(endpoint.to_string().parse::<Endpoint>(), Ok(endpoint));
}

/// Over a unix socket the client knows the process that serves it (the
/// kernel's SO_PEERCRED, here this test process); over a stream, nobody.
#[tokio::test]
async fn a_unix_socket_names_its_peer_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = async {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, write) = tokio::io::split(stream);
        let mut lines = BufReader::new(read).lines();
        let mut write = write;
        write.write_all(format!("{GREETING}\r\n").as_bytes()).await.expect("greet");
        let line = lines.next_line().await.expect("read").expect("capabilities");
        let caps: Value = serde_json::from_str(&line).expect("json");
        write
            .write_all(format!("{}\r\n", json!({"return": {}, "id": caps["id"]})).as_bytes())
            .await
            .expect("reply");
        (lines, write)
    };
    let endpoint = Endpoint::Unix(path);
    let (client, _held) = tokio::join!(QmpClient::connect(&endpoint, config()), server);
    assert_eq!(client.expect("connect").peer_pid(), Some(std::process::id()));
    let (stream_client, _qemu) = connected().await;
    assert_eq!(stream_client.peer_pid(), None);
}
