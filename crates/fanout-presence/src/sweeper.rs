//! The presence role's [`Sweeper`]: removes the presences of edges whose
//! liveness key expired with one atomic Lua script per node, and publishes
//! their leave diffs on the bus.

use std::sync::Arc;
use std::time::Duration;

use fanout_bus::Bus;
use fanout_core::{ChannelName, Event, PresenceDiff};
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use crate::store::{Entry, RedisError};

/// Removes every presence of `ARGV[1]` (a node) if its liveness key is gone,
/// atomically, and returns `[channel, [entry json, …], …]`.
const SWEEP_SCRIPT: &str = r"
local node = ARGV[1]
if redis.call('EXISTS', 'fanout:alive:' .. node) == 1 then return {} end
local chs = redis.call('SMEMBERS', 'fanout:node:' .. node .. ':ch')
local prefix = node .. ':'
local out = {}
for _, ch in ipairs(chs) do
  local h = 'fanout:p:' .. ch
  local all = redis.call('HGETALL', h)
  local removed = {}
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, #prefix) == prefix then
      redis.call('HDEL', h, all[i])
      table.insert(removed, all[i + 1])
    end
  end
  if #removed > 0 then
    table.insert(out, ch)
    table.insert(out, removed)
  end
end
redis.call('DEL', 'fanout:node:' .. node .. ':ch')
redis.call('SREM', 'fanout:nodes', node)
return out
";

/// The presence role's sweeper: expires crashed edges' presences and
/// announces the leaves.
pub struct Sweeper {
    conn: ConnectionManager,
    bus: Arc<dyn Bus>,
    interval: Duration,
    script: redis::Script,
}

impl std::fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Sweeper {
    pub fn new(conn: ConnectionManager, bus: Arc<dyn Bus>, interval: Duration) -> Self {
        Self {
            conn,
            bus,
            interval,
            script: redis::Script::new(SWEEP_SCRIPT),
        }
    }

    /// Sweeps every `interval` until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            match self.sweep_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "expired presences of crashed edges"),
                Err(e) => {
                    metrics::counter!("fanout_presence_sweep_errors_total").increment(1);
                    tracing::warn!(error = %e, "presence sweep failed");
                }
            }
        }
    }

    /// One sweep; returns how many presences were removed (by this sweeper).
    pub async fn sweep_once(&self) -> Result<usize, RedisError> {
        let mut conn = self.conn.clone();
        let nodes: Vec<String> = redis::cmd("SMEMBERS")
            .arg("fanout:nodes")
            .query_async(&mut conn)
            .await?;
        let mut removed = 0;
        for node in nodes {
            let out: Vec<redis::Value> = self.script.arg(&node).invoke_async(&mut conn).await?;
            for pair in out.chunks(2) {
                let [channel, entries] = pair else { continue };
                let Ok(channel) = redis::from_redis_value::<String>(channel.clone()) else {
                    continue;
                };
                let Ok(entries) = redis::from_redis_value::<Vec<String>>(entries.clone()) else {
                    continue;
                };
                let Ok(channel) = ChannelName::from_internal(&channel) else {
                    continue;
                };
                let mut diff = PresenceDiff::default();
                for e in entries.iter().filter_map(|s| Entry::from_json(s)) {
                    diff.leaves.entry(e.key.clone()).or_default().push(e.client_meta());
                    removed += 1;
                }
                let event = Event::presence_diff(channel, &diff, None);
                if let Err(e) = self.bus.publish(event).await {
                    tracing::warn!(error = %e, "leave diff of a crashed edge not published");
                }
            }
        }
        metrics::counter!("fanout_presence_expired_total").increment(removed as u64);
        Ok(removed)
    }
}
