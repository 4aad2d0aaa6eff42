//! A stalled allocator: it welcomes the session and then never answers.
//! Each request gives up after the call timeout, and the session stays
//! usable (a VM loop retries with backoff instead of hanging for ever).

#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};
use vmscale_allocator_client::{channel, ClientError, SessionClient};
use vmscale_proto::allocator as pb;
use vmscale_proto::allocator::agent_message::Body;
use vmscale_proto::allocator::allocator_message::Body as Reply;

type Out = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AllocatorMessage, Status>> + Send>>;

/// Welcomes every session, then reads and never answers.
struct Stalled;

#[tonic::async_trait]
impl pb::allocator_server::Allocator for Stalled {
    type SessionStream = Out;

    async fn session(&self, req: Request<Streaming<pb::AgentMessage>>) -> Result<Response<Out>, Status> {
        let mut inbound = req.into_inner();
        let _hello = inbound.message().await?;
        let welcome = pb::AllocatorMessage {
            request_id: 0,
            body: Some(Reply::Welcome(pb::Welcome { version: 1, ..Default::default() })),
        };
        // Keep reading (so requests are taken), answer nothing.
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        let out = tokio_stream::once(Ok(welcome));
        let out = tokio_stream::StreamExt::chain(out, tokio_stream::pending());
        Ok(Response::new(Box::pin(out)))
    }
}

#[tokio::test]
async fn a_request_to_a_stalled_allocator_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::allocator_server::AllocatorServer::new(Stalled))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let hello = pb::Hello { node: "a".into(), ..Default::default() };
    let s = SessionClient::open(channel(&addr).await.unwrap(), hello).await.unwrap();
    let s = s.with_call_timeout(Duration::from_millis(200));
    for _ in 0..2 {
        let t0 = Instant::now();
        let e = s.call(Body::Ping(pb::Ping {})).await.unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)), "{e}");
        assert!(e.to_string().contains("did not answer within 200 ms"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }
}
