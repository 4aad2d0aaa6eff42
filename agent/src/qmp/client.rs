//! An async QMP client: one connection, commands matched to replies by id,
//! events fanned out on a broadcast channel.
//!
//! Two tasks own the socket. The writer task writes whole lines taken from a
//! channel, so a caller that gives up (timeout, dropped future) never leaves a
//! half-written command on the wire. The reader task routes replies to the
//! waiting callers and events to subscribers; when the socket closes it fails
//! every waiting caller at once, which is how a dead QEMU turns into
//! [`Error::Disconnected`] instead of a hang.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::AbortHandle;

use super::error::{Error, Result};
use super::event::QmpEvent;
use super::wire::{encode_command, parse_server_line, Greeting, ServerMessage};

/// Longest line we accept from QEMU. The largest replies we ask for
/// (`query-hotpluggable-cpus` on a 288-vCPU machine) are tens of KiB.
const MAX_LINE_BYTES: u64 = 16 << 20;

/// Where QEMU's QMP server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `-qmp unix:PATH,server=on,wait=off`
    Unix(PathBuf),
    /// `-qmp tcp:HOST:PORT,server=on,wait=off`
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// `tcp:IP:PORT`, `unix:PATH`, or a bare path (a unix socket).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if let Some(addr) = s.strip_prefix("tcp:") {
            return addr
                .parse()
                .map(Endpoint::Tcp)
                .map_err(|e| format!("qmp endpoint {s:?}: {e}; write tcp:IP:PORT, e.g. tcp:127.0.0.1:4444"));
        }
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.trim().is_empty() {
            return Err(format!("qmp endpoint {s:?} names no socket path"));
        }
        Ok(Endpoint::Unix(PathBuf::from(path)))
    }
}

/// Timeouts and buffer sizes of one connection.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// For the greeting and `qmp_capabilities`. QEMU serves one QMP client
    /// per socket: a second one is accepted by the kernel but gets no greeting
    /// until the first leaves, so this is also how long such a client waits.
    pub handshake_timeout: Duration,
    /// Default per-command timeout. Queries and `device_add` return in
    /// 1-11 ms on this machine under TCG; this only catches a stuck QEMU.
    pub command_timeout: Duration,
    /// Events buffered per subscriber before the slowest one lags (it then
    /// sees `RecvError::Lagged` and should re-read state with a query).
    pub event_capacity: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            event_capacity: 1024,
        }
    }
}

type Reply = std::result::Result<Value, (String, String)>;

/// What the reader task and the callers share.
struct Shared {
    state: Mutex<State>,
}

struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    events: Option<broadcast::Sender<QmpEvent>>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain maps behind; keep going.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(&self, id: u64) -> Result<oneshot::Receiver<Reply>> {
        let mut state = self.lock();
        if let Some(reason) = &state.closed {
            return Err(Error::Disconnected { reason: reason.clone() });
        }
        let (tx, rx) = oneshot::channel();
        state.pending.insert(id, tx);
        Ok(rx)
    }

    fn complete(&self, id: u64, reply: Reply) {
        let waiter = self.lock().pending.remove(&id);
        match waiter {
            // The caller may have given up meanwhile; nothing to do then.
            Some(tx) => drop(tx.send(reply)),
            None => tracing::debug!(id, "qmp reply for a command nobody waits for"),
        }
    }

    fn publish(&self, event: QmpEvent) {
        if let Some(events) = &self.lock().events {
            // No subscriber is not an error: events are hints.
            drop(events.send(event));
        }
    }

    /// Ends the connection for everyone: waiting callers see their reply
    /// channel close, subscribers see the event channel close.
    fn close(&self, reason: String) {
        let mut state = self.lock();
        if state.closed.is_none() {
            tracing::debug!(%reason, "qmp connection closed");
            state.closed = Some(reason);
        }
        state.pending.clear();
        state.events = None;
    }

    fn closed_reason(&self) -> String {
        self.lock().closed.clone().unwrap_or_else(|| "connection closed".to_string())
    }
}

/// Removes a caller's reply slot however its future ends.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

struct Inner {
    shared: Arc<Shared>,
    lines: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU64,
    greeting: Greeting,
    endpoint: String,
    config: ClientConfig,
    reader: AbortHandle,
    /// The process at the other end of a unix socket (`SO_PEERCRED`, as it
    /// was when we connected), in this agent's pid namespace.
    peer_pid: Option<u32>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer task ends by itself when `lines` is dropped.
        self.reader.abort();
    }
}

/// A connected, negotiated QMP session. Cheap to clone; all clones share the
/// connection. Commands from many tasks may run at once.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("endpoint", &self.inner.endpoint)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// Connects, reads the greeting and leaves negotiation mode.
    pub async fn connect(endpoint: &Endpoint, config: ClientConfig) -> Result<Self> {
        let name = endpoint.to_string();
        let connect_error = |source| Error::Connect { endpoint: name.clone(), source };
        match endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(connect_error)?;
                let peer_pid =
                    stream.peer_cred().ok().and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok());
                Self::handshake_with_peer(stream, name, config, peer_pid).await
            }
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr).await.map_err(connect_error)?;
                // Small request/reply lines: Nagle would add up to 40 ms each.
                stream.set_nodelay(true).map_err(connect_error)?;
                Self::handshake(stream, name, config).await
            }
        }
    }

    /// Runs the QMP handshake over any byte stream (tests use an in-memory one).
    pub async fn handshake<S>(stream: S, endpoint: String, config: ClientConfig) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::handshake_with_peer(stream, endpoint, config, None).await
    }

    /// [`Self::handshake`], knowing the process at the other end.
    async fn handshake_with_peer<S>(
        stream: S,
        endpoint: String,
        config: ClientConfig,
        peer_pid: Option<u32>,
    ) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let mut reader = BufReader::new(read);
        let handshake_error = |reason: String| Error::Handshake { endpoint: endpoint.clone(), reason };

        let mut line = Vec::new();
        let greeting =
            match tokio::time::timeout(config.handshake_timeout, read_line(&mut reader, &mut line)).await {
                Err(_) => {
                    return Err(handshake_error(format!(
                        "no greeting within {:?} (is another client connected?)",
                        config.handshake_timeout
                    )))
                }
                Ok(Err(e)) => return Err(handshake_error(format!("reading the greeting: {e}"))),
                Ok(Ok(false)) => return Err(handshake_error("closed before the greeting".into())),
                Ok(Ok(true)) => match parse_server_line(&line) {
                    Ok(ServerMessage::Greeting(g)) => g,
                    Ok(other) => return Err(handshake_error(format!("expected a greeting: {other:?}"))),
                    Err(e) => return Err(handshake_error(e)),
                },
            };

        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(State { pending: HashMap::new(), events: Some(events), closed: None }),
        });
        let (lines, to_write) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(write, to_write, shared.clone()));
        let reader = tokio::spawn(read_loop(reader, shared.clone())).abort_handle();
        let client = QmpClient {
            inner: Arc::new(Inner {
                shared,
                lines,
                next_id: AtomicU64::new(1),
                greeting,
                endpoint: endpoint.clone(),
                config: config.clone(),
                reader,
                peer_pid,
            }),
        };
        client
            .execute_with_timeout::<Value>("qmp_capabilities", None, config.handshake_timeout)
            .await
            .map_err(|e| handshake_error(format!("qmp_capabilities: {e}")))?;
        Ok(client)
    }

    /// QEMU's version and capabilities, from the greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// The pid of the process that serves this QMP socket, from the unix
    /// socket's peer credentials; `None` over TCP or an in-memory stream.
    pub fn peer_pid(&self) -> Option<u32> {
        self.inner.peer_pid
    }

    /// Where this client is connected, for messages.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The default per-command timeout of this connection.
    pub fn command_timeout(&self) -> Duration {
        self.inner.config.command_timeout
    }

    /// False once QEMU has closed the connection.
    pub fn is_connected(&self) -> bool {
        self.inner.shared.lock().closed.is_none()
    }

    /// A new subscription to QEMU's events, from now on. Subscribe before the
    /// command whose event you wait for. Once the connection ends the channel
    /// reports `Closed`.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        match &self.inner.shared.lock().events {
            Some(events) => events.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Runs a command with the connection's default timeout and decodes its
    /// `return` value.
    pub async fn execute<R: DeserializeOwned>(&self, command: &str, arguments: Option<Value>) -> Result<R> {
        self.execute_with_timeout(command, arguments, self.inner.config.command_timeout).await
    }

    /// Runs a command with its own timeout and decodes its `return` value.
    pub async fn execute_with_timeout<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<R> {
        let value = self.execute_raw(command, arguments, timeout).await?;
        serde_json::from_value(value).map_err(|source| Error::Decode { command: command.to_string(), source })
    }

    async fn execute_raw(&self, command: &str, arguments: Option<Value>, timeout: Duration) -> Result<Value> {
        let shared = &*self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let reply = shared.register(id)?;
        let _guard = PendingGuard { shared, id };
        let line = encode_command(command, arguments.as_ref(), Some(id));
        if self.inner.lines.send(line).is_err() {
            return Err(Error::Disconnected { reason: shared.closed_reason() });
        }
        match tokio::time::timeout(timeout, reply).await {
            Err(_) => Err(Error::Timeout { command: command.to_string(), after: timeout }),
            Ok(Err(_)) => Err(Error::Disconnected { reason: shared.closed_reason() }),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err((class, desc)))) => Err(Error::Qemu { command: command.to_string(), class, desc }),
        }
    }
}

/// Reads one line into `line` (cleared first). `Ok(false)` at end of stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<bool> {
    line.clear();
    let n = reader.take(MAX_LINE_BYTES).read_until(b'\n', line).await?;
    if n == 0 {
        return Ok(false);
    }
    if line.last() != Some(&b'\n') && n as u64 == MAX_LINE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE_BYTES} bytes"),
        ));
    }
    Ok(true)
}

async fn read_loop<R: AsyncRead + Send + Unpin>(mut reader: BufReader<R>, shared: Arc<Shared>) {
    let mut line = Vec::new();
    let reason = loop {
        match read_line(&mut reader, &mut line).await {
            Ok(false) => break "qemu closed the qmp connection".to_string(),
            Err(e) => break format!("reading from qmp: {e}"),
            Ok(true) => {}
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_server_line(&line) {
            Ok(ServerMessage::Return { id: Some(id), value }) => shared.complete(id, Ok(value)),
            Ok(ServerMessage::Error { id: Some(id), class, desc }) => shared.complete(id, Err((class, desc))),
            Ok(ServerMessage::Event(event)) => shared.publish(event),
            // Replies without an id answer requests QEMU could not parse; we
            // only send serde-encoded lines, so log and let the caller time out.
            Ok(other) => tracing::warn!(?other, "unexpected qmp message"),
            Err(e) => tracing::warn!(error = %e, "skipping malformed qmp line"),
        }
    };
    shared.close(reason);
}

async fn write_loop<W: AsyncWrite>(
    write: W,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    tokio::pin!(write);
    while let Some(line) = lines.recv().await {
        let written = async {
            write.write_all(&line).await?;
            write.flush().await
        };
        if let Err(e) = written.await {
            shared.close(format!("writing to qmp: {e}"));
            return;
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
