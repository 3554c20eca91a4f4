//! Publishes one message through the server API's gRPC service, as the
//! README shows: `cargo run -p fanout-api --example publish -- KEY`.
//! Needs a fanout with API keys on 127.0.0.1:9700.

use fanout_proto::v1::{PublishRequest, publish_request::Payload, server_api_client::ServerApiClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api_key = std::env::args().nth(1).ok_or("usage: publish API_KEY")?;
    let channel = tonic::transport::Channel::from_static("http://127.0.0.1:9700")
        .connect()
        .await?;
    let key: tonic::metadata::MetadataValue<_> = format!("Bearer {api_key}").parse()?;
    let mut api = ServerApiClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", key.clone());
        Ok(req)
    });
    let answer = api
        .publish(PublishRequest {
            channel: "workshop:42".into(),
            event: "user_signed_up".into(),
            payload: Some(Payload::Json(r#"{"id": 7}"#.into())),
            idempotency_key: "signup-7".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("stored at {} (duplicate: {})", answer.position, answer.duplicate);
    Ok(())
}
