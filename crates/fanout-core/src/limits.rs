//! Limits on everything a client controls.

use std::time::Duration;

/// Per-connection and per-message limits. Every field has a safe default and
/// can be set from config; the edge enforces them with an error reply or a
/// close code, never a panic.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket message accepted from a client, in bytes.
    pub max_frame_bytes: usize,
    /// Channels one connection may have joined at once.
    pub max_channels_per_connection: usize,
    /// Frames queued for one connection before it counts as a slow consumer
    /// and is disconnected. Large enough for a burst of database changes
    /// (a 10,000-row UPDATE is 10,000 frames); frames are shared between
    /// connections, so a queue mostly holds references.
    pub outbound_queue_frames: usize,
    /// Messages (any event) a connection may send per second, sustained;
    /// bursts up to twice this are allowed.
    pub messages_per_second: u32,
    /// Joins a connection may send per second, sustained.
    pub joins_per_second: u32,
    /// Open client connections per process; beyond it the handshake gets 429.
    pub max_connections: usize,
    /// Open connections per client IP (0: no limit); beyond it, 429.
    pub max_connections_per_ip: usize,
    /// Open connections per user (`sub`) (0: no limit); beyond it, 429.
    pub max_connections_per_sub: usize,
    /// `Origin`s a browser handshake may come from (empty: any); others get 403.
    pub allowed_origins: Vec<String>,
    /// The request header that names the client's IP when a proxy is in front
    /// (its first address, e.g. `x-forwarded-for`); `None` uses the peer address.
    pub client_ip_header: Option<String>,
    /// An HTTP request (the WebSocket handshake included) must arrive whole
    /// within this long, or the TCP connection is closed (slowloris).
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
    /// A connection that sends nothing (not even a heartbeat) for this long is
    /// closed. realtime-js sends a heartbeat every 25 s.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// The write window: frames for one connection queued within it leave
    /// in one vectored write at its end (Centrifugo's `client.write_delay`).
    /// Zero writes each batch at once.
    #[serde(with = "millis")]
    pub write_delay: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 20,
            max_channels_per_connection: 100,
            outbound_queue_frames: 16_384,
            messages_per_second: 1000,
            joins_per_second: 50,
            max_connections: 100_000,
            max_connections_per_ip: 0,
            max_connections_per_sub: 0,
            allowed_origins: Vec::new(),
            client_ip_header: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_delay: Duration::ZERO,
        }
    }
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms: u64 = serde::Deserialize::deserialize(d)?;
        Ok(Duration::from_millis(ms))
    }
}

mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs: u64 = serde::Deserialize::deserialize(d)?;
        Ok(Duration::from_secs(secs))
    }
}
