//! The control seam: commands that must reach every edge (the server API's
//! `Channels`, `Info`, `Disconnect`, `Unsubscribe`) and the edges' answers.
//!
//! An edge [`Control::serve`]s a [`CommandHandler`]; the API
//! [`Control::ask`]s, and gets one [`NodeReport`] from every edge that
//! answered in time. Standalone plugs in [`MemoryControl`] (the one local
//! handler); cluster mode plugs in [`NatsControl`]: commands on the core NATS
//! subject `fanout-ctl.cmd`, answers to the asker's inbox, and a heartbeat
//! on `fanout-ctl.alive` every two seconds (and at once when a process that
//! just started asks on `fanout-ctl.ping`), so an asker knows how many
//! answers to wait for instead of always waiting out its timeout. Commands
//! are JSON: rare, small, and readable with `nats sub 'fanout-ctl.>'`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::bus::{BoxFuture, BusError, unavailable};

/// A command for every edge. Channels are internal names
/// (`ChannelName::as_str`), so a private channel stays apart from the
/// public one of the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Report connections and channels.
    Info,
    /// Report every channel with local members, and how many.
    Channels,
    /// Close every connection of user `sub`; with `reconnect: false` its
    /// channels are closed first, so a client that reconnects by itself
    /// (realtime-js does) does not rejoin them.
    Disconnect {
        sub: String,
        reason: String,
        reconnect: bool,
    },
    /// End user `sub`'s membership of `channel` (a `system` message and
    /// `phx_close`), on every connection.
    Unsubscribe {
        sub: String,
        channel: String,
        reason: String,
    },
}

/// One edge's answer to a [`Command`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The edge's node id (hex), random per process start.
    pub node: String,
    /// Open client connections.
    pub connections: u64,
    /// Channels with local members.
    pub channels: u64,
    pub uptime_secs: u64,
    /// For `Channels`: each channel (internal name) with its local members.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<(String, u64)>,
    /// For `Disconnect` and `Unsubscribe`: connections it applied to.
    #[serde(default)]
    pub affected: u64,
}

/// What an edge does with a command (it must answer at once: every
/// command only looks up or signals local state).
pub trait CommandHandler: Send + Sync + 'static {
    fn handle(&self, command: Command) -> NodeReport;
}

/// Sends commands to every edge. See the module docs.
pub trait Control: Send + Sync + 'static {
    /// Runs `command` on every edge; the reports of those that answered.
    fn ask(&self, command: Command) -> BoxFuture<'_, Result<Vec<NodeReport>, BusError>>;
    /// Answers commands with `handler` as node `node` until `shutdown`.
    fn serve(
        &self,
        node: String,
        handler: Arc<dyn CommandHandler>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'_, Result<(), BusError>>;
}

/// The control of standalone: the handlers of this process.
#[derive(Default)]
pub struct MemoryControl {
    handlers: Mutex<Vec<Arc<dyn CommandHandler>>>,
}

impl std::fmt::Debug for MemoryControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryControl").finish_non_exhaustive()
    }
}

impl Control for MemoryControl {
    fn ask(&self, command: Command) -> BoxFuture<'_, Result<Vec<NodeReport>, BusError>> {
        let handlers = self.handlers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let reports = handlers.iter().map(|h| h.handle(command.clone())).collect();
        Box::pin(async move { Ok(reports) })
    }

    fn serve(
        &self,
        _node: String,
        handler: Arc<dyn CommandHandler>,
        _shutdown: CancellationToken,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        self.handlers.lock().unwrap_or_else(|e| e.into_inner()).push(handler);
        Box::pin(async { Ok(()) })
    }
}

const COMMAND_SUBJECT: &str = "fanout-ctl.cmd";
const ALIVE_SUBJECT: &str = "fanout-ctl.alive";
/// Asks every serving edge to announce itself now (a process that just
/// started has not heard their heartbeats yet).
const PING_SUBJECT: &str = "fanout-ctl.ping";
/// How often a serving edge says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// An edge silent for this long is not waited for.
const ALIVE_FOR: Duration = Duration::from_secs(6);
/// The longest an ask waits for the edges it expects.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an ask gathers answers when it knows of no edge yet.
const GATHER: Duration = Duration::from_millis(500);

/// The control of cluster mode, over core NATS. See the module docs.
pub struct NatsControl {
    client: async_nats::Client,
    alive: Arc<Mutex<HashMap<String, Instant>>>,
}

impl std::fmt::Debug for NatsControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsControl").finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Alive {
    node: String,
}

impl NatsControl {
    /// Starts following the edges' heartbeats on `client` (until
    /// `shutdown`).
    pub async fn new(client: async_nats::Client, shutdown: CancellationToken) -> Result<Self, BusError> {
        let mut beats = client.subscribe(ALIVE_SUBJECT).await.map_err(unavailable)?;
        client
            .publish(PING_SUBJECT, bytes::Bytes::new())
            .await
            .map_err(unavailable)?;
        let alive: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let seen = alive.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = shutdown.cancelled() => break,
                    msg = beats.next() => match msg {
                        Some(msg) => msg,
                        None => break,
                    },
                };
                if let Ok(a) = serde_json::from_slice::<Alive>(&msg.payload) {
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    seen.retain(|_, at| at.elapsed() < ALIVE_FOR);
                    seen.insert(a.node, Instant::now());
                }
            }
        });
        Ok(Self { client, alive })
    }

    /// Edges heard from recently.
    fn expected(&self) -> usize {
        let alive = self.alive.lock().unwrap_or_else(|e| e.into_inner());
        alive.values().filter(|at| at.elapsed() < ALIVE_FOR).count()
    }

    async fn ask_now(&self, command: Command) -> Result<Vec<NodeReport>, BusError> {
        let payload = serde_json::to_vec(&command).map_err(unavailable)?;
        let inbox = self.client.new_inbox();
        let mut answers = self.client.subscribe(inbox.clone()).await.map_err(unavailable)?;
        self.client
            .publish_with_reply(COMMAND_SUBJECT, inbox, payload.into())
            .await
            .map_err(unavailable)?;
        self.client.flush().await.map_err(unavailable)?;
        let expected = self.expected();
        let deadline = tokio::time::Instant::now() + if expected == 0 { GATHER } else { ASK_TIMEOUT };
        let mut reports: Vec<NodeReport> = Vec::new();
        while expected == 0 || reports.len() < expected {
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await else {
                break;
            };
            match serde_json::from_slice::<NodeReport>(&msg.payload) {
                Ok(r) if !reports.iter().any(|x| x.node == r.node) => reports.push(r),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "undecodable control answer skipped"),
            }
        }
        Ok(reports)
    }

    async fn serve_now(
        &self,
        node: String,
        handler: Arc<dyn CommandHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), BusError> {
        let mut commands = self.client.subscribe(COMMAND_SUBJECT).await.map_err(unavailable)?;
        let mut pings = self.client.subscribe(PING_SUBJECT).await.map_err(unavailable)?;
        let client = self.client.clone();
        let alive = serde_json::to_vec(&Alive { node }).map_err(unavailable)?;
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(HEARTBEAT);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = beat.tick() => announce(&client, &alive).await,
                    // A process that just started asks: answer at once.
                    Some(_) = pings.next() => announce(&client, &alive).await,
                    msg = commands.next() => {
                        let Some(msg) = msg else { break };
                        let Some(reply) = msg.reply else { continue };
                        let report = match serde_json::from_slice::<Command>(&msg.payload) {
                            Ok(command) => handler.handle(command),
                            Err(e) => {
                                tracing::warn!(error = %e, "undecodable control command skipped");
                                continue;
                            }
                        };
                        match serde_json::to_vec(&report) {
                            Ok(answer) => {
                                if let Err(e) = client.publish(reply, answer.into()).await {
                                    tracing::debug!(error = %e, "control answer not sent");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "control answer not encoded"),
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

/// Publishes this edge's heartbeat.
async fn announce(client: &async_nats::Client, alive: &[u8]) {
    if let Err(e) = client.publish(ALIVE_SUBJECT, alive.to_vec().into()).await {
        tracing::debug!(error = %e, "control heartbeat not sent");
    }
}

impl Control for NatsControl {
    fn ask(&self, command: Command) -> BoxFuture<'_, Result<Vec<NodeReport>, BusError>> {
        Box::pin(self.ask_now(command))
    }

    fn serve(
        &self,
        node: String,
        handler: Arc<dyn CommandHandler>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(self.serve_now(node, handler, shutdown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(u64);

    impl CommandHandler for Fixed {
        fn handle(&self, command: Command) -> NodeReport {
            NodeReport {
                node: format!("{:x}", self.0),
                connections: self.0,
                affected: u64::from(matches!(command, Command::Disconnect { .. })),
                ..NodeReport::default()
            }
        }
    }

    #[tokio::test]
    async fn memory_control_asks_every_local_handler() {
        let control = MemoryControl::default();
        assert_eq!(control.ask(Command::Info).await.unwrap(), vec![]);
        for n in [1, 2] {
            control
                .serve(n.to_string(), Arc::new(Fixed(n)), CancellationToken::new())
                .await
                .unwrap();
        }
        let reports = control
            .ask(Command::Disconnect {
                sub: "u".into(),
                reason: "r".into(),
                reconnect: false,
            })
            .await
            .unwrap();
        assert_eq!(reports.iter().map(|r| r.connections).collect::<Vec<_>>(), vec![1, 2]);
        assert!(reports.iter().all(|r| r.affected == 1));
    }

    #[test]
    fn commands_are_tagged_json() {
        let c = Command::Unsubscribe {
            sub: "u1".into(),
            channel: "workshop:42".into(),
            reason: "removed".into(),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"command":"unsubscribe","sub":"u1","channel":"workshop:42","reason":"removed"}"#
        );
        assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), c);
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"command":"info"}"#).unwrap(),
            Command::Info
        );
    }
}
