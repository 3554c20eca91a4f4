//! [`PresenceApi`], the gRPC service `fanout.v1.Presence`. This is the one
//! module of the crate that names the generated protobuf types
//! (`fanout_proto::v1`). Its answers come from [`read_channel`], plus a
//! SCAN of the presence hashes to list the channels.

use std::collections::BTreeSet;

use fanout_core::ChannelName;
use redis::aio::ConnectionManager;
use serde_json::Value;

use crate::store::read_channel;

/// The gRPC presence API (`fanout.v1.Presence`), answered from Redis with
/// the same liveness filter as `presence_state`.
#[derive(Clone)]
pub struct PresenceApi {
    conn: ConnectionManager,
}

impl std::fmt::Debug for PresenceApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceApi").finish_non_exhaustive()
    }
}

impl PresenceApi {
    pub fn new(conn: ConnectionManager) -> Self {
        Self { conn }
    }

    /// The tonic service, ready for `Server::add_service`.
    pub fn into_service(self) -> fanout_proto::v1::presence_server::PresenceServer<Self> {
        fanout_proto::v1::presence_server::PresenceServer::new(self)
    }

    async fn count(&self, channel: &str) -> Result<fanout_proto::v1::ChannelCount, tonic::Status> {
        let entries = read_channel(&mut self.conn.clone(), channel, None)
            .await
            .map_err(unavailable)?;
        let keys: BTreeSet<&str> = entries.iter().map(|(_, e)| e.key.as_str()).collect();
        Ok(fanout_proto::v1::ChannelCount {
            channel: channel.to_owned(),
            presences: entries.len() as u32,
            keys: keys.len() as u32,
        })
    }
}

fn unavailable(e: redis::RedisError) -> tonic::Status {
    tonic::Status::unavailable(format!("presence store unavailable: {e}"))
}

fn channel_arg(name: &str) -> Result<ChannelName, tonic::Status> {
    ChannelName::from_name_or_topic(name).map_err(|e| tonic::Status::invalid_argument(format!("channel: {e}")))
}

#[tonic::async_trait]
impl fanout_proto::v1::presence_server::Presence for PresenceApi {
    async fn get_presences(
        &self,
        request: tonic::Request<fanout_proto::v1::GetPresencesRequest>,
    ) -> Result<tonic::Response<fanout_proto::v1::GetPresencesResponse>, tonic::Status> {
        let channel = channel_arg(&request.into_inner().channel)?;
        let entries = read_channel(&mut self.conn.clone(), channel.as_str(), None)
            .await
            .map_err(unavailable)?;
        let presences = entries
            .into_iter()
            .map(|(_, e)| fanout_proto::v1::PresenceEntry {
                key: e.key,
                phx_ref: e.phx_ref,
                meta_json: Value::Object(e.meta).to_string(),
            })
            .collect();
        Ok(tonic::Response::new(fanout_proto::v1::GetPresencesResponse {
            presences,
        }))
    }

    async fn count_online(
        &self,
        request: tonic::Request<fanout_proto::v1::CountOnlineRequest>,
    ) -> Result<tonic::Response<fanout_proto::v1::CountOnlineResponse>, tonic::Status> {
        let mut counts = Vec::new();
        for name in request.into_inner().channels {
            let channel = channel_arg(&name)?;
            counts.push(self.count(channel.as_str()).await?);
        }
        Ok(tonic::Response::new(fanout_proto::v1::CountOnlineResponse { counts }))
    }

    async fn list_channels(
        &self,
        request: tonic::Request<fanout_proto::v1::ListChannelsRequest>,
    ) -> Result<tonic::Response<fanout_proto::v1::ListChannelsResponse>, tonic::Status> {
        let limit = match request.into_inner().limit {
            0 => 100,
            n => n as usize,
        };
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut names = BTreeSet::new();
        // Bounded: at most 100 SCAN pages of 1,000 keys.
        for _ in 0..100 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("fanout:p:*")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            names.extend(
                keys.into_iter()
                    .filter_map(|k| k.strip_prefix("fanout:p:").map(str::to_owned)),
            );
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut channels = Vec::with_capacity(names.len());
        for name in names {
            let c = self.count(&name).await?;
            if c.presences > 0 {
                channels.push(c);
            }
        }
        channels.sort_by(|a, b| b.presences.cmp(&a.presences).then_with(|| a.channel.cmp(&b.channel)));
        channels.truncate(limit);
        Ok(tonic::Response::new(fanout_proto::v1::ListChannelsResponse {
            channels,
        }))
    }
}
