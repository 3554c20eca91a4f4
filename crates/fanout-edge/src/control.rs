//! The edge's side of the control seam ([`fanout_bus::Control`]): what it
//! answers to `Info` and `Channels`, and how `Disconnect` and `Unsubscribe`
//! reach the connections of one user.
//!
//! Every connection registers a small [`ConnControl`] (the users it acts
//! for, a mailbox of kicks and a `Notify`) in [`Sessions`]. A command
//! finds the connections of its `sub`, leaves a [`Kick`] in each mailbox
//! and wakes them; each connection applies its kicks in its own task, in
//! order with everything else it does, between two client messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use fanout_bus::{Command, CommandHandler, NodeReport};
use fanout_core::ChannelName;
use tokio::sync::Notify;

use crate::Edge;

/// What a command asks of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kick {
    /// Close the connection; without `reconnect`, close its channels first.
    Disconnect { reason: String, reconnect: bool },
    /// End `sub`'s membership of `channel`.
    Unsubscribe {
        sub: String,
        channel: ChannelName,
        reason: String,
    },
    /// The membership sets of `sub` (of everyone, when `None`) changed:
    /// re-decide the private channels whose rules read them, and end those
    /// the user may no longer read.
    Recheck { sub: Option<String> },
}

impl Kick {
    /// How a connection the server API disconnects closes: 1012 (service
    /// restart) when it may come back, which clients retry, else 1008.
    pub(crate) fn disconnect_close(reason: String, reconnect: bool) -> crate::frame::CloseReason {
        use crate::frame::close_code;
        let code = if reconnect {
            close_code::SERVICE_RESTART
        } else {
            close_code::POLICY
        };
        crate::frame::CloseReason::new(code, reason, "disconnected")
    }
}

/// One connection's entry in [`Sessions`].
#[derive(Debug, Default)]
pub(crate) struct ConnControl {
    /// The users (`sub`s) the connection acts for: its token's, and those
    /// of joins with their own `access_token`.
    subs: Mutex<Vec<String>>,
    kicks: Mutex<Vec<Kick>>,
    /// Woken when a kick is left.
    pub(crate) notify: Notify,
}

impl ConnControl {
    /// Records that the connection acts for `sub`.
    pub(crate) fn add_sub(&self, sub: &str) {
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        if !subs.iter().any(|s| s == sub) {
            subs.push(sub.to_owned());
        }
    }

    fn acts_for(&self, sub: &str) -> bool {
        self.subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|s| s == sub)
    }

    fn push(&self, kick: Kick) {
        self.kicks.lock().unwrap_or_else(|e| e.into_inner()).push(kick);
        self.notify.notify_one();
    }

    /// The kicks left since the last call, oldest first.
    pub(crate) fn take(&self) -> Vec<Kick> {
        std::mem::take(&mut *self.kicks.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Every connection of the edge, by connection id.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    conns: Mutex<HashMap<u64, Arc<ConnControl>>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnControl>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers connection `id` acting for `sub`.
    pub(crate) fn register(&self, id: u64, sub: Option<&str>) -> Arc<ConnControl> {
        let control = Arc::new(ConnControl::default());
        if let Some(sub) = sub {
            control.add_sub(sub);
        }
        self.lock().insert(id, control.clone());
        control
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Leaves `kick` with every connection acting for `sub` (every
    /// connection, when `None`); how many.
    fn kick(&self, sub: Option<&str>, kick: &Kick) -> u64 {
        let targets: Vec<Arc<ConnControl>> = self
            .lock()
            .values()
            .filter(|c| sub.is_none_or(|s| c.acts_for(s)))
            .cloned()
            .collect();
        for c in &targets {
            c.push(kick.clone());
        }
        targets.len() as u64
    }
}

/// The edge's [`CommandHandler`]. It holds the edge weakly: a handler
/// registered with the memory control must not keep a stopped edge alive.
#[derive(Debug)]
pub struct EdgeCommands {
    edge: Weak<Edge>,
    started: Instant,
}

impl EdgeCommands {
    pub fn new(edge: &Arc<Edge>) -> Self {
        Self {
            edge: Arc::downgrade(edge),
            started: Instant::now(),
        }
    }
}

/// The reason given when a command names none.
const DEFAULT_REASON: &str = "disconnected by the server";

impl CommandHandler for EdgeCommands {
    fn handle(&self, command: Command) -> NodeReport {
        let Some(edge) = self.edge.upgrade() else {
            return NodeReport::default();
        };
        let mut report = NodeReport {
            node: format!("{:016x}", edge.node),
            connections: edge.connection_count() as u64,
            channels: edge.hub.channel_count() as u64,
            uptime_secs: self.started.elapsed().as_secs(),
            ..NodeReport::default()
        };
        let reason = |r: String| if r.is_empty() { DEFAULT_REASON.to_owned() } else { r };
        match command {
            Command::Info => {}
            Command::Channels => {
                report.members = edge
                    .hub
                    .members()
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(c, n)| (c.as_str().to_owned(), n as u64))
                    .collect();
            }
            Command::Disconnect {
                sub,
                reason: why,
                reconnect,
            } => {
                let kick = Kick::Disconnect {
                    reason: reason(why),
                    reconnect,
                };
                report.affected = edge.sessions.kick(Some(&sub), &kick);
            }
            Command::Unsubscribe {
                sub,
                channel,
                reason: why,
            } => match ChannelName::from_internal(&channel) {
                Ok(channel) => {
                    let kick = Kick::Unsubscribe {
                        sub: sub.clone(),
                        channel,
                        reason: reason(why),
                    };
                    report.affected = edge.sessions.kick(Some(&sub), &kick);
                }
                Err(e) => tracing::warn!(error = %e, "unsubscribe command for an invalid channel skipped"),
            },
        }
        report
    }
}

/// Follows the membership mirror: each user whose memberships changed gets
/// a [`Kick::Recheck`] on every connection acting for them (everyone's
/// connections when the feed lagged, or when a set's user is not the
/// `sub` claim, which connections are registered by). Runs until
/// shutdown; only started when membership sets are configured.
pub(crate) async fn follow_memberships(edge: Weak<Edge>, shutdown: tokio_util::sync::CancellationToken) {
    let Some(mirror) = edge.upgrade().map(|e| e.config.members.clone()) else {
        return;
    };
    let mut changes = mirror.changes();
    loop {
        let change = tokio::select! {
            c = changes.recv() => c,
            () = shutdown.cancelled() => return,
        };
        let Some(edge) = edge.upgrade() else { return };
        let by_sub = |set: &str| {
            edge.config
                .policy
                .memberships
                .get(set)
                .is_some_and(|s| s.claim == ["sub"])
        };
        let sub = match change {
            Ok(c) if by_sub(&c.set) => Some(c.user),
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let n = edge.sessions.kick(sub.as_deref(), &Kick::Recheck { sub: sub.clone() });
        metrics::counter!("fanout_members_rechecks_total").increment(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kicks_reach_only_the_users_connections() {
        let sessions = Sessions::default();
        let a = sessions.register(1, Some("alice"));
        let b = sessions.register(2, Some("bob"));
        let anon = sessions.register(3, None);
        anon.add_sub("alice");
        let kick = Kick::Disconnect {
            reason: "bye".into(),
            reconnect: true,
        };
        assert_eq!(sessions.kick(Some("alice"), &kick), 2);
        assert_eq!(a.take(), vec![kick.clone()]);
        assert_eq!(anon.take(), vec![kick.clone()]);
        assert!(b.take().is_empty());
        assert!(a.take().is_empty(), "taken once");
        sessions.unregister(1);
        assert_eq!(sessions.kick(Some("alice"), &kick), 1);
        assert_eq!(sessions.kick(Some("nobody"), &kick), 0);
    }
}
