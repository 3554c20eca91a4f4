//! What every role's process shares: the root shutdown token, turned on by
//! SIGTERM/SIGINT, and the tracker of the tasks the role starts itself, which
//! shutdown waits for.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The root of a role's process.
pub struct Process {
    /// Cancelled when the process must stop; every part of the role watches
    /// it or a child of it.
    pub shutdown: CancellationToken,
    /// Every task the role spawns outside the edge (which tracks its own in
    /// `Edge::tasks`), so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl Process {
    pub fn new() -> Self {
        Self {
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Cancels the root token on SIGTERM or SIGINT. The task also ends when
    /// the token is cancelled otherwise, so it never holds up
    /// [`Process::shut_down`].
    pub fn cancel_on_signal(&self) {
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = shutdown_signal() => {
                    tracing::info!("shutdown requested; closing connections");
                    shutdown.cancel();
                }
                () = shutdown.cancelled() => {}
            }
        });
    }

    /// Cancels the root token (if a signal has not already) and waits at
    /// most `grace` for every tracked task to finish.
    pub async fn shut_down(&self, grace: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                remaining = self.tasks.len(),
                "shutdown grace period over; tasks left running"
            );
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
