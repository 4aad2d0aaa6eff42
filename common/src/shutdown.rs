//! How every daemon learns it should stop: SIGTERM (what Kubernetes and
//! systemd send) or Ctrl-C. A daemon that waits only for Ctrl-C is killed
//! mid-operation by every rollout, after the grace period.

/// A token cancelled at the first SIGTERM or SIGINT (logged as
/// `SIGTERM: shutting down`): what every daemon's `main` hands its server.
/// Call it inside a tokio runtime.
pub fn on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let stop = token.clone();
    tokio::spawn(async move {
        let which = signal().await;
        tracing::info!("{which}: shutting down");
        stop.cancel();
    });
    token
}

/// Resolves at the first SIGTERM or SIGINT; names which.
pub async fn signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        // No signal handling at all (it cannot be installed): wait forever
        // rather than stop at once.
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn sigterm_is_seen() {
        let waiting = tokio::spawn(super::signal());
        // Let the handlers be installed before the signal is sent.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // SAFETY: raise only sends a signal to this process; the handler
        // installed above turns it into a wake-up instead of termination.
        let rc = unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(rc, 0);
        let which = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!(which, "SIGTERM");
    }
}
