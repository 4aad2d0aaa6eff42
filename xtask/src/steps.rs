//! Running child commands as numbered, visible steps: a newcomer sees what is
//! happening and how far along it is, and a failure names the step.

use anyhow::{bail, Context};
use std::process::Command;
use std::time::Instant;

#[derive(Debug)]
pub struct Steps {
    total: usize,
    done: usize,
}

impl Steps {
    pub fn new(total: usize) -> Self {
        Steps { total, done: 0 }
    }

    /// Prints the step's title, runs it with output streaming to the terminal,
    /// and fails with the title and the exit status if it fails.
    pub fn run(&mut self, title: &str, cmd: &mut Command) -> anyhow::Result<()> {
        self.done += 1;
        eprintln!("\n==> [{}/{}] {title}", self.done, self.total);
        eprintln!("    $ {}", show(cmd));
        let t0 = Instant::now();
        let status = cmd.status().with_context(|| format!("cannot start `{}`", show(cmd)))?;
        if !status.success() {
            bail!("step {}/{} ({title}) failed: {status}", self.done, self.total);
        }
        eprintln!("    done in {:.1} s", t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// Like [`run`](Self::run) for a step done in-process.
    pub fn call(&mut self, title: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        self.done += 1;
        eprintln!("\n==> [{}/{}] {title}", self.done, self.total);
        let t0 = Instant::now();
        f().with_context(|| format!("step {}/{} ({title}) failed", self.done, self.total))?;
        eprintln!("    done in {:.1} s", t0.elapsed().as_secs_f64());
        Ok(())
    }
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// `cargo`, as the one running xtask (so the same toolchain builds everything).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(crate::workspace_root());
    c
}
