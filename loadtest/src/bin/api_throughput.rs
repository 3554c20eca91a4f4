//! `fanout-api-throughput`: how fast the server API stores messages, against
//! the engine's own ceiling, from one client process on this machine.
//!
//! Each round runs four phases on fresh channels, in alternating order:
//! - `jetstream`: the same envelopes the API would store, published straight
//!   to the channel's JetStream subject (pipelined, 256 acks in flight);
//! - `publish_stream`: gRPC `PublishStream`, one stream of every message;
//! - `unary`: gRPC `Publish`, `--concurrency` calls in flight;
//! - `http`: `POST /api/v1/publish`, `--concurrency` keep-alive connections.
//!
//! It prints messages per second per phase and round, and each API phase's
//! mean over the jetstream mean.
//!
//!   fanout-api-throughput --nats-url nats://127.0.0.1:4222 \
//!     --api 127.0.0.1:9700 --api-key KEY --shards 8 --streams 2

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use fanout_core::{ChannelName, Event, shard_of, subject_token};
use fanout_proto::v1;
use http_body_util::{BodyExt, Full};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
struct Args {
    /// The NATS server the edge uses.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The edge's server API address (host:port).
    #[arg(long, default_value = "127.0.0.1:9700")]
    api: String,
    #[arg(long, env = "FANOUT_LOADTEST_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The edge's --nats-shards and --nats-streams (to find a channel's subject).
    #[arg(long, default_value_t = 64)]
    shards: u32,
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// Messages per phase.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Unary calls and HTTP connections in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: u64,
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Payload padding bytes.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
}

fn payload(i: u64, pad: &str) -> String {
    format!(r#"{{"i":{i},"pad":"{pad}"}}"#)
}

async fn jetstream(args: &Args, channel: &str, pad: &str) -> Result<()> {
    let client = async_nats::connect(&args.nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let name = ChannelName::new(channel)?;
    let subject = format!(
        "fanout.{}.{}",
        shard_of(name.as_str(), args.shards),
        subject_token(name.as_str())
    );
    let mut acks = Vec::with_capacity(256);
    for i in 0..args.messages {
        let event = Event::broadcast(name.clone(), "bench", Bytes::from(payload(i, pad)), false, None);
        acks.push(
            js.send_publish(
                subject.clone(),
                async_nats::jetstream::message::PublishMessage::build().payload(fanout_proto::encode_event(&event)),
            )
            .await?,
        );
        if acks.len() == 256 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

/// Adds the API key to every call.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = v1::server_api_client::ServerApiClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn grpc(args: &Args) -> Result<Client> {
    let channel = Channel::from_shared(format!("http://{}", args.api))?.connect().await?;
    let key = format!("Bearer {}", args.api_key).parse()?;
    Ok(v1::server_api_client::ServerApiClient::with_interceptor(
        channel,
        Bearer(key),
    ))
}

fn request(channel: &str, i: u64, pad: &str) -> v1::PublishRequest {
    v1::PublishRequest {
        channel: channel.into(),
        event: "bench".into(),
        payload: Some(v1::publish_request::Payload::Json(payload(i, pad))),
        id: i,
        ..Default::default()
    }
}

async fn publish_stream(args: &Args, channel: &str, pad: &str) -> Result<()> {
    let mut api = grpc(args).await?;
    let (channel, pad, n) = (channel.to_owned(), pad.to_owned(), args.messages);
    let requests = tokio_stream::iter((0..n).map(move |i| request(&channel, i, &pad)));
    let mut answers = api.publish_stream(requests).await?.into_inner();
    let mut got = 0;
    while let Some(a) = answers.message().await? {
        if !a.error.is_empty() {
            bail!("publish {} refused: {}", a.id, a.error);
        }
        got += 1;
    }
    if got != n {
        bail!("{got} answers for {n} messages");
    }
    Ok(())
}

async fn unary(args: &Args, channel: &str, pad: &str) -> Result<()> {
    let api = grpc(args).await?;
    let per = args.messages / args.concurrency;
    let mut tasks = Vec::new();
    for t in 0..args.concurrency {
        let (mut api, channel, pad) = (api.clone(), channel.to_owned(), pad.to_owned());
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                api.publish(request(&channel, t * per + i, &pad)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn http(args: &Args, channel: &str, pad: &str) -> Result<()> {
    let per = args.messages / args.concurrency;
    let mut tasks = Vec::new();
    for t in 0..args.concurrency {
        let (addr, key, channel, pad) = (
            args.api.clone(),
            args.api_key.clone(),
            channel.to_owned(),
            pad.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            for i in 0..per {
                let body = format!(
                    r#"{{"channel":"{channel}","event":"bench","payload":{}}}"#,
                    payload(t * per + i, &pad)
                );
                let req = hyper::Request::post("/api/v1/publish")
                    .header("host", &addr)
                    .header("authorization", format!("Bearer {key}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                if !status.is_success() {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

const PHASES: [&str; 4] = ["jetstream", "publish_stream", "unary", "http"];

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let pad = "x".repeat(args.payload_bytes);
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len()];
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..PHASES.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for p in order {
            let channel = format!("bench:api:{}:{round}:{}", PHASES[p], std::process::id());
            let t0 = Instant::now();
            match PHASES[p] {
                "jetstream" => jetstream(&args, &channel, &pad).await,
                "publish_stream" => publish_stream(&args, &channel, &pad).await,
                "unary" => unary(&args, &channel, &pad).await,
                _ => http(&args, &channel, &pad).await,
            }
            .with_context(|| format!("phase {}", PHASES[p]))?;
            let n = if p >= 2 {
                args.messages / args.concurrency * args.concurrency
            } else {
                args.messages
            };
            let rate = n as f64 / t0.elapsed().as_secs_f64();
            println!("round {round} {:>14}: {rate:>9.0} msg/s", PHASES[p]);
            rates[p].push(rate);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let ceiling = mean(&rates[0]);
    println!("mean jetstream (the ceiling): {ceiling:.0} msg/s");
    for p in 1..PHASES.len() {
        let m = mean(&rates[p]);
        println!(
            "mean {:>14}: {m:>9.0} msg/s = {:.3}x the ceiling",
            PHASES[p],
            m / ceiling
        );
    }
    Ok(())
}
