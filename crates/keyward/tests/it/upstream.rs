//! A real upstream HTTP server for the gateway tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

#[derive(Clone, Default)]
pub struct Upstream {
    /// Released by the test to let the SSE stream send its second event.
    pub release: Arc<Notify>,
    /// Every request seen: (path, headers as lower-case name → value).
    pub seen: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn echo(
    State(up): State<Upstream>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        headers.insert(
            name.as_str().to_owned(),
            json!(String::from_utf8_lossy(value.as_bytes())),
        );
    }
    let seen = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": body.len(),
        // Which of keyward's upstream connections carried it.
        "peer_port": peer.port(),
    });
    up.seen.lock().unwrap().push(seen.clone());
    axum::Json(seen).into_response()
}

async fn sse(State(up): State<Upstream>) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let _ = tx.send(Bytes::from_static(b"data: first\n\n")).await;
        up.release.notified().await;
        let _ = tx.send(Bytes::from_static(b"data: second\n\n")).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn slow() -> &'static str {
    tokio::time::sleep(Duration::from_secs(5)).await;
    "late"
}

/// Answers, then closes the connection (as an upstream at its keep-alive limit does).
async fn close() -> Response {
    ([("connection", "close")], "closing").into_response()
}

async fn status(Path(code): Path<u16>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
    (status, [("x-upstream", "yes")], "upstream says so").into_response()
}

/// Starts the upstream on an ephemeral port of the test's runtime.
pub async fn start() -> (SocketAddr, Upstream) {
    let up = Upstream::default();
    let app = Router::new()
        .route("/sse", get(sse))
        .route("/api/sse", get(sse))
        .route("/api/slow", get(slow))
        .route("/api/status/{code}", get(status))
        .route("/api/close", get(close))
        .fallback(any(echo))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    (addr, up)
}
