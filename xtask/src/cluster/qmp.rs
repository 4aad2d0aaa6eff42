//! A minimal blocking QMP client for watching a VM through its second
//! monitor (the agent holds the first): what QEMU really has, not what the
//! agent says.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let s = UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut q = Qmp { reader: BufReader::new(s.try_clone()?), writer: s };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            bail!("no QMP greeting on {}: {greeting}", path.display());
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QMP closed");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; its `return`, skipping events.
    pub fn execute(&mut self, cmd: &str, args: Value) -> anyhow::Result<Value> {
        writeln!(self.writer, "{}", json!({ "execute": cmd, "arguments": args }))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
        }
    }

    /// Plugged DIMMs (ids) and the guest's memory (base + plugged), bytes.
    pub fn memory(&mut self) -> anyhow::Result<(Vec<String>, u64)> {
        let devs = self.execute("query-memory-devices", json!({}))?;
        let ids = devs
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|d| d.get("type").and_then(Value::as_str) == Some("dimm"))
                    .map(|d| d.pointer("/data/id").and_then(Value::as_str).unwrap_or("?").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let s = self.execute("query-memory-size-summary", json!({}))?;
        let total = s.get("base-memory").and_then(Value::as_u64).unwrap_or(0)
            + s.get("plugged-memory").and_then(Value::as_u64).unwrap_or(0);
        Ok((ids, total))
    }
}
