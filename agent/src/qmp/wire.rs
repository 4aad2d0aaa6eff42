//! The QMP wire format, kept pure: one JSON object per line each way. Parsing
//! and encoding live here so they can be tested on captured bytes without a
//! socket.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::event::QmpEvent;

/// QEMU's version as its greeting states it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct QemuVersion {
    pub qemu: VersionTriple,
    /// Distribution build string, e.g. `Debian 1:7.2+dfsg-7+deb12u18+b3`.
    pub package: String,
}

/// `major.minor.micro`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub struct VersionTriple {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// The first line QEMU sends on a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Greeting {
    pub version: QemuVersion,
    pub capabilities: Vec<String>,
}

/// One line from QEMU, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Greeting(Greeting),
    /// A successful reply; `id` is `None` when the command carried none (or
    /// one that is not ours, i.e. not an unsigned integer).
    Return {
        id: Option<u64>,
        value: Value,
    },
    /// A failed command. QEMU also sends these without an id when it could
    /// not parse a request at all.
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

#[derive(Deserialize)]
struct RawError {
    class: String,
    desc: String,
}

/// Classifies one line. A line that is valid JSON but none of the four QMP
/// shapes is a protocol error, reported with the line for the log.
pub fn parse_server_line(line: &[u8]) -> Result<ServerMessage, String> {
    let mut object: serde_json::Map<String, Value> = serde_json::from_slice(line)
        .map_err(|e| format!("not a json object ({e}): {}", String::from_utf8_lossy(line)))?;
    // Ids we send are integers; anything else cannot be one of our commands.
    let id = object.get("id").and_then(Value::as_u64);
    if let Some(value) = object.remove("return") {
        return Ok(ServerMessage::Return { id, value });
    }
    if let Some(error) = object.remove("error") {
        let RawError { class, desc } =
            serde_json::from_value(error).map_err(|e| format!("error reply without class and desc: {e}"))?;
        return Ok(ServerMessage::Error { id, class, desc });
    }
    if object.contains_key("event") {
        let event: QmpEvent =
            serde_json::from_value(Value::Object(object)).map_err(|e| format!("malformed event: {e}"))?;
        return Ok(ServerMessage::Event(event));
    }
    if let Some(greeting) = object.remove("QMP") {
        let greeting: Greeting =
            serde_json::from_value(greeting).map_err(|e| format!("malformed greeting: {e}"))?;
        return Ok(ServerMessage::Greeting(greeting));
    }
    Err(format!("unknown message: {}", String::from_utf8_lossy(line).trim_end()))
}

#[derive(Serialize)]
struct Request<'a> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
}

/// Encodes one command as a line, newline included.
pub fn encode_command(command: &str, arguments: Option<&Value>, id: Option<u64>) -> Vec<u8> {
    let request = Request { execute: command, arguments, id };
    // A struct of strings, a JSON value and an integer always serializes.
    let mut line = serde_json::to_vec(&request).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

    #[test]
    fn parses_qemu_7_2_greeting() {
        let ServerMessage::Greeting(g) = parse_server_line(GREETING).expect("parses") else {
            panic!("not a greeting");
        };
        assert_eq!(g.version.qemu, VersionTriple { major: 7, minor: 2, micro: 22 });
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
    }

    #[test]
    fn parses_return_with_and_without_id() {
        let m = parse_server_line(br#"{"return": {}, "id": 6}"#).expect("parses");
        assert_eq!(m, ServerMessage::Return { id: Some(6), value: json!({}) });
        let m = parse_server_line(br#"{"return": {}}"#).expect("parses");
        assert_eq!(m, ServerMessage::Return { id: None, value: json!({}) });
        // A string id is not one of ours.
        let m = parse_server_line(br#"{"return": 1, "id": "x"}"#).expect("parses");
        assert_eq!(m, ServerMessage::Return { id: None, value: json!(1) });
    }

    #[test]
    fn parses_error_reply() {
        let line = br#"{"id": 13, "error": {"class": "GenericError", "desc": "'nope' is not a valid device model name"}}"#;
        assert_eq!(
            parse_server_line(line).expect("parses"),
            ServerMessage::Error {
                id: Some(13),
                class: "GenericError".into(),
                desc: "'nope' is not a valid device model name".into()
            }
        );
    }

    #[test]
    fn parses_event() {
        let line = br#"{"timestamp": {"seconds": 1700000000, "microseconds": 12}, "event": "DEVICE_DELETED", "data": {"device": "dimm0", "path": "/machine/peripheral/dimm0"}}"#;
        let ServerMessage::Event(e) = parse_server_line(line).expect("parses") else {
            panic!("not an event");
        };
        assert_eq!(e.name, "DEVICE_DELETED");
        assert_eq!(e.data["device"], "dimm0");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_server_line(b"hello").is_err());
        assert!(parse_server_line(b"[1,2]").is_err());
        assert!(parse_server_line(br#"{"what": 1}"#).is_err());
        assert!(parse_server_line(br#"{"error": "x"}"#).is_err());
    }

    #[test]
    fn encodes_commands_as_one_line() {
        let args = json!({"driver": "pc-dimm", "id": "d"});
        let line = encode_command("device_add", Some(&args), Some(7));
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back: Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(back, json!({"execute": "device_add", "arguments": args, "id": 7}));
        let bare = encode_command("qmp_capabilities", None, None);
        assert_eq!(bare, b"{\"execute\":\"qmp_capabilities\"}\n".to_vec());
    }
}
