//! The floor under keyward's proxy mode: the same HTTP stack and runtime shape as keyward (one
//! pinned current-thread runtime per core on its own `SO_REUSEPORT` socket, hyper-util's auto
//! builder with the header read timeout, one upstream connection per client connection driven
//! by a task of its own), forwarding every request that carries a credential to the upstream
//! with the credential removed — and no domain work at all: no key check, no limits, no
//! identity headers, no metrics. `bench/run.sh` measures it as scenario i: what keyward's proxy
//! costs above it is its domain work; what the floor costs against nginx is the stack itself.
//! `cargo run --release -p keyward-server --example proxy_floor -- [port] [upstream]`
//! (default 19008, 127.0.0.1:19000).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::Mutex;

type Upstream = Arc<Mutex<Option<SendRequest<Incoming>>>>;

async fn connect(upstream: SocketAddr) -> Option<SendRequest<Incoming>> {
    let stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

fn answer(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

async fn forward(
    mut request: Request<Incoming>,
    slot: Upstream,
    upstream: SocketAddr,
) -> Result<Response<Body>, std::convert::Infallible> {
    if request
        .headers_mut()
        .remove(header::AUTHORIZATION)
        .is_none()
    {
        return Ok(answer(StatusCode::UNAUTHORIZED));
    }
    // Requests of one client connection come one after another: the lock is never contended.
    let mut sender = slot.lock().await;
    if sender.as_ref().is_none_or(|s| !s.is_ready()) {
        *sender = connect(upstream).await;
    }
    let Some(ready) = sender.as_mut() else {
        return Ok(answer(StatusCode::BAD_GATEWAY));
    };
    match ready.send_request(request).await {
        Ok(response) => Ok(response.map(Body::new)),
        Err(_) => Ok(answer(StatusCode::BAD_GATEWAY)),
    }
}

async fn serve(listener: tokio::net::TcpListener, upstream: SocketAddr) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        tokio::spawn(async move {
            let slot: Upstream = Arc::default();
            let service =
                hyper::service::service_fn(move |request| forward(request, slot.clone(), upstream));
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let port = args.next().and_then(|p| p.parse().ok()).unwrap_or(19008);
    let upstream: SocketAddr = args
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 19000)));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listeners = keyward_server::serve::bind_workers(addr, workers)?;
    let threads = keyward_server::serve::spawn_workers(
        listeners,
        core_affinity::get_core_ids(),
        move |listener| serve(listener, upstream),
    )?;
    for thread in threads {
        thread
            .join()
            .map_err(|_| std::io::Error::other("a worker panicked"))??;
    }
    Ok(())
}
