//! The roles of the binary, one subcommand each.

/// What a `fanout` process runs.
#[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything in one process with an in-memory bus and presence (the default).
    Standalone,
    /// A stateless edge of a cluster: events go through NATS JetStream (needs --nats-url;
    /// with --redis-url, presence is shared through Redis).
    Edge,
    /// The presence role: expires crashed edges' users from Redis and announces their
    /// leaves (needs --nats-url and --redis-url; run one or more).
    Presence,
    /// The change-data-capture ingester: PostgreSQL changes into JetStream (needs
    /// --database-url and --nats-url; run two for failover: one streams, the other waits).
    Cdc,
}

impl Role {
    /// The subcommand's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Edge => "edge",
            Self::Presence => "presence",
            Self::Cdc => "cdc",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
