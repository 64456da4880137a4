//! The floor under keyward's forward-auth answer: the same HTTP stack and runtime shape (one
//! pinned current-thread runtime per core on its own `SO_REUSEPORT` socket, hyper-util's
//! auto builder with the header read timeout), answering every request with a fixed 200 that
//! carries a forward-auth answer's headers — and no domain work at all. `bench/run.sh`
//! measures it as scenario h: what keyward's forward-auth costs above it is authentication,
//! limits, usage, identity and metrics; what it costs below nginx is the stack itself.
//! `cargo run --release -p keyward-server --example http_floor -- [port]` (default 19007).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request, Response, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

/// A forward-auth answer's headers, sized like keyward's (the identity token is ~420 bytes).
const ANSWER: [(&str, &str); 9] = [
    ("x-ratelimit-limit", "1000000000"),
    ("x-ratelimit-remaining", "999999999"),
    ("x-ratelimit-reset", "60"),
    ("x-keyward-org-id", "org_01M832800RHVJW45M3PNCW1DE6"),
    ("x-keyward-project-id", "proj_01M832800RR2SFFY5BPTFYXVD7"),
    ("x-keyward-key-id", "key_01M832808B0P85A9171X14VJCS"),
    ("x-keyward-scopes", "inference"),
    ("x-keyward-identity", IDENTITY),
    ("x-request-id", "req_01M8328AW188JMC0QPQYK4N5YM"),
];
const IDENTITY: &str = concat!(
    "eyJ0eXAiOiJrdy1pZGVudGl0eStqd3QiLCJhbGciOiJFZERTQSIsImtpZCI6Imt3XzAxTTgzMjgwMFFZWDQyWlRZUTYxQjBZMU1YIn0",
    ".eyJpc3MiOiJodHRwOi8vbG9jYWxob3N0OjgwODAiLCJzdWIiOiJrZXlfMDFNODMyODA4QjBQODVBOTE3MVgxNFZKQ1MiLCJhdWQiOiJrZXl3YXJkLXVwc3RyZWFtIiwib3JnX2lkIjoib3JnXzAxTTgzMjgwMFJIVkpXNDVNM1BOQ1cxREU2IiwicHJvamVjdF9pZCI6InByb2pfMDFNODMyODAwUlIyU0ZGWTVCUFRGWVhWRDciLCJrZXlfaWQiOiJrZXlfMDFNODMyODA4QjBQODVBOTE3MVgxNFZKQ1MiLCJzY29wZXMiOlsiaW5mZXJlbmNlIl0sImlhdCI6MTc5NTM5OTM2MywibmJmIjoxNzk1Mzk5MzYzLCJleHAiOjE3OTUzOTk0MjMsImp0aSI6IjAxTTgzMjhBVzI5TVhSQTlGUk1ZMFFDWlBCIn0",
    ".JLglFNK6XF9bOokH9uk9LN4wXX6ikJUp_azi3D862IwMA098Iyz2CG5hFV4EX4aT--CwI5u9xurzKEP3QW_9CA",
);

fn answer(request: &Request<Incoming>) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    // Touch the credential as a gateway would, so the request's headers are not dead weight.
    if request.headers().contains_key(header::AUTHORIZATION) {
        let headers = response.headers_mut();
        headers.reserve(ANSWER.len());
        for (name, value) in ANSWER {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
    } else {
        *response.status_mut() = axum::http::StatusCode::UNAUTHORIZED;
    }
    response
}

async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let builder = std::sync::Arc::new(builder);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                Ok::<_, Infallible>(answer(&request))
            });
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() -> std::io::Result<()> {
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(19007);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listeners = keyward_server::serve::bind_workers(addr, workers)?;
    let threads =
        keyward_server::serve::spawn_workers(listeners, core_affinity::get_core_ids(), serve)?;
    for thread in threads {
        thread
            .join()
            .map_err(|_| std::io::Error::other("a worker panicked"))??;
    }
    Ok(())
}
