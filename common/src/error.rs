//! One way to print an error: its message and every `source()` below it.
//! `{e:#}` prints only the top message of a `thiserror` type, which lost
//! the cause ("connection refused") in more than one log line.

use std::fmt;

/// Displays `top: cause: root cause`.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// The chain as a `String`, for error fields and status messages.
pub fn chain(e: &dyn std::error::Error) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot register with the allocator")]
    struct Top(#[source] std::io::Error);

    #[test]
    fn prints_every_cause() {
        let e = Top(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"));
        assert_eq!(chain(&e), "cannot register with the allocator: connection refused");
        assert_eq!(format!("{}", Chain(&e)), chain(&e));
    }
}
