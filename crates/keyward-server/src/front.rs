//! The public listener's front door: a thin hyper service per connection.
//!
//! Gateway requests (the hot path) go straight to the data plane — no router, no boxed
//! middleware layers — and forward-auth checks likewise. keyward's own API, CORS requests
//! (`Origin`, preflights) and anything else go through the full axum application. Profiles of
//! the proxy path put the layers it skips at about a tenth of keyward's own CPU time.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::data_plane::route_and_forward;
use crate::forward_auth::{self, FORWARD_AUTH_PATH};
use crate::middleware::RequestContext;
use crate::proxy::ClientConn;
use crate::state::AppState;

pub struct Front {
    state: AppState,
    app: Router,
    /// keyward's own path patterns, matched as the axum router matches them.
    own: matchit::Router<()>,
}

enum Lane {
    Gateway,
    ForwardAuth,
    Application,
}

impl Front {
    pub fn new(state: AppState) -> Self {
        let mut own = matchit::Router::new();
        for path in crate::own_paths(&state) {
            // A pattern that does not insert conflicts with one already there: covered.
            let _ = own.insert(path, ());
        }
        Self {
            app: crate::app(state.clone()),
            state,
            own,
        }
    }

    fn lane(&self, req: &Request<Body>) -> Lane {
        let cors = req.method() == Method::OPTIONS || req.headers().contains_key(header::ORIGIN);
        if cors {
            return Lane::Application;
        }
        let path = req.uri().path();
        if path == FORWARD_AUTH_PATH && req.method() == Method::GET {
            return Lane::ForwardAuth;
        }
        if self.own.at(path).is_ok() {
            Lane::Application
        } else {
            Lane::Gateway
        }
    }

    /// Answers one request of a client connection (any body: hyper's on a socket, an
    /// in-memory one in benchmarks).
    pub async fn handle<B>(&self, client: &ClientConn, req: Request<B>) -> Response
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let mut req = req.map(Body::new);
        match self.lane(&req) {
            Lane::Application => {
                req.extensions_mut().insert(ConnectInfo(client.peer));
                match self.app.clone().oneshot(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
            Lane::ForwardAuth => {
                let context = RequestContext::begin(req.method(), req.uri());
                let (response, route) = match forward_auth::check(
                    &self.state,
                    client.peer.ip(),
                    req.headers(),
                    req.extensions(),
                )
                .await
                {
                    Ok(checked) => checked,
                    Err(e) => (e.into_response(), None),
                };
                context.finish_routed(&self.state, response, route.map(|r| &*r.name))
            }
            Lane::Gateway => {
                let context = RequestContext::begin(req.method(), req.uri());
                let (response, route) =
                    route_and_forward(&self.state, client, req, Some(context.request_id())).await;
                context.finish_routed(&self.state, response, route.map(|r| &*r.name))
            }
        }
    }
}

/// Accepts and serves connections until `stop`, then lets open ones finish their requests.
pub async fn serve(
    listener: TcpListener,
    front: Arc<Front>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(front.state.config.server.header_read_timeout);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let first_bytes = front.state.config.server.header_read_timeout;
        // One reference count per request, on the connection's own allocation: the shared
        // `Front`'s count would bounce between the workers' cores on every request.
        let connection = Arc::new((front.clone(), ClientConn::new(peer, &front.state)));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let connection = connection.clone();
            async move {
                let (front, client) = &*connection;
                Ok::<_, Infallible>(front.handle(client, req).await)
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            // Telling HTTP/1 from HTTP/2 waits for the first bytes with no timer of its own; the
            // header read timeout (slow headers, idle keep-alive) starts after it. A connection
            // that has sent nothing when the drain starts has no request to finish: it closes
            // (HTTP clients open spare connections that may never carry a request).
            let mut first = [0u8; 1];
            let peeked = tokio::select! {
                peeked = tokio::time::timeout(first_bytes, stream.peek(&mut first)) => peeked,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            if !matches!(peeked, Ok(Ok(1))) {
                return;
            }
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
