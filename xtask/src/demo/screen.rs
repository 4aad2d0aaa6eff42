//! Puts rendered frames on stdout: redrawn in place, like `top`, when it is
//! a terminal; as separated frames, one every `every`, when it is not (a
//! test's or CI's log), so that the log stays readable and small.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::view::{render, Frame};

/// Cursor to the top left corner.
const HOME: &str = "\x1b[H";
/// Clears from the cursor to the end of its line.
const CLEAR_LINE: &str = "\x1b[K";
/// Clears from the cursor to the end of the screen.
const CLEAR_DOWN: &str = "\x1b[J";

/// Where frames go.
#[derive(Debug)]
pub(super) struct Screen {
    terminal: bool,
    every: Duration,
    last_plain: Option<Instant>,
}

impl Screen {
    /// In place on a terminal; otherwise a frame every `every`.
    pub fn new(every: Duration) -> Screen {
        Screen { terminal: std::io::stdout().is_terminal(), every, last_plain: None }
    }

    /// Shows `f` (in a log: only if `every` has passed since the last one).
    pub fn show(&mut self, f: &Frame) -> std::io::Result<()> {
        let text = if self.terminal {
            in_place(&render(f))
        } else {
            if self.last_plain.is_some_and(|t| t.elapsed() < self.every) {
                return Ok(());
            }
            self.last_plain = Some(Instant::now());
            plain(&render(f), f.elapsed)
        };
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    }
}

/// A screen drawn over the last one: home, each line cleared past its end
/// (no blank flash between frames, as a full clear would give), and what is
/// left below the new frame cleared.
pub(super) fn in_place(screen: &str) -> String {
    let mut s = String::with_capacity(screen.len() + 256);
    s.push_str(HOME);
    for l in screen.lines() {
        s.push_str(l);
        s.push_str(CLEAR_LINE);
        s.push('\n');
    }
    s.push_str(CLEAR_DOWN);
    s
}

/// A frame for a log: a separator line with the time, then the screen.
pub(super) fn plain(screen: &str, elapsed: Duration) -> String {
    format!("\n--- {} s ---\n{screen}", elapsed.as_secs())
}
