//! A TCP client that sends a numbered line every interval to an echo server
//! in the guest and times every line that comes back: the proof that a
//! connection survives a live migration, and its longest silence.

use anyhow::{bail, Context};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the client saw.
#[derive(Debug, Clone, PartialEq)]
pub struct EchoReport {
    pub sent: u64,
    pub received: u64,
    /// Lines sent that never came back.
    pub lost: u64,
    /// Lines that came back garbled or out of order.
    pub wrong: u64,
    /// Longest time between two lines coming back (or from the start to the
    /// first), in milliseconds.
    pub max_gap_ms: f64,
    pub interval_ms: u64,
}

/// A running client; [`EchoClient::finish`] stops it and reports.
#[derive(Debug)]
pub struct EchoClient {
    stop: Arc<AtomicBool>,
    /// How many lines the reader waits for; set once the sender stopped.
    expect: Arc<AtomicU64>,
    writer: JoinHandle<anyhow::Result<u64>>,
    reader: JoinHandle<(u64, u64, f64)>,
    stream: TcpStream,
    interval: Duration,
}

/// Connects, retrying until `timeout` (the guest may still be booting) or
/// until `gone` says why the guest cannot answer any more.
pub fn connect(
    addr: SocketAddr,
    timeout: Duration,
    mut gone: impl FnMut() -> Option<String>,
) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(why) = gone() {
            bail!("no echo server at {addr}: {why}");
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => {
                bail!("no echo server at {addr} after {timeout:?}: {e} (did the guest boot? see its console log)")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

impl EchoClient {
    /// Starts sending on `stream` every `interval`, after checking that the
    /// server really echoes.
    pub fn start(stream: TcpStream, interval: Duration) -> anyhow::Result<EchoClient> {
        // An accepted connection is not yet an echo: busybox nc forks `cat`
        // after accepting. One line back proves the path end to end.
        let mut probe = BufReader::new(stream.try_clone()?);
        (&stream).write_all(b"hello\n")?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut line = String::new();
        probe.read_line(&mut line).context("the echo server did not answer the first line")?;
        if line != "hello\n" {
            bail!("the echo server answered {line:?} to \"hello\"");
        }
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;

        let stop = Arc::new(AtomicBool::new(false));
        let mut out = stream.try_clone()?;
        let stop_w = stop.clone();
        let writer = std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut seq = 0u64;
            let mut next = Instant::now();
            while !stop_w.load(Ordering::Relaxed) {
                out.write_all(format!("{seq}\n").as_bytes()).context("sending to the echo server")?;
                seq += 1;
                next += interval;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            Ok(seq)
        });
        let expect = Arc::new(AtomicU64::new(u64::MAX));
        let expect_r = expect.clone();
        let reader = std::thread::spawn(move || read_loop(probe, &expect_r));
        Ok(EchoClient { stop, expect, writer, reader, stream, interval })
    }

    /// Stops sending, waits up to `drain` for the last lines, and reports.
    pub fn finish(self, drain: Duration) -> anyhow::Result<EchoReport> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.writer.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
        self.expect.store(sent, Ordering::Relaxed);
        // The reader stops once every line is back; the shutdown ends it
        // otherwise.
        let deadline = Instant::now() + drain;
        while !self.reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let (received, wrong, max_gap_ms) =
            self.reader.join().map_err(|_| anyhow::anyhow!("the receiver panicked"))?;
        Ok(EchoReport {
            sent,
            received,
            lost: sent.saturating_sub(received),
            wrong,
            max_gap_ms,
            interval_ms: vmscale_common::time::millis(self.interval),
        })
    }
}

/// Reads echoed lines until the connection ends; returns (received, wrong,
/// longest gap in ms).
fn read_loop(mut input: BufReader<TcpStream>, expect: &AtomicU64) -> (u64, u64, f64) {
    let mut last = Instant::now();
    let (mut received, mut wrong, mut max_gap) = (0u64, 0u64, 0f64);
    let mut line = String::new();
    while received < expect.load(Ordering::Relaxed) {
        match input.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if line.ends_with('\n') => {
                let now = Instant::now();
                max_gap = max_gap.max(now.duration_since(last).as_secs_f64() * 1000.0);
                last = now;
                if line.trim_end().parse::<u64>() != Ok(received) {
                    wrong += 1;
                }
                received += 1;
                line.clear();
            }
            // A partial line stays in `line` for the next read.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    (received, wrong, max_gap)
}
