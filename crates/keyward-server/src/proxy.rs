//! Forwarding an authorised request to its upstream: a pooled hyper client per worker thread
//! (connections stay on the runtime that uses them), bodies streamed both ways, hop-by-hop
//! headers dropped (RFC 9110 §7.6.1), the credential hidden, identity headers set after every
//! client-sent copy is dropped.

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::uri::{Authority, Scheme};
use axum::http::{Uri, Version};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyward_core::ErrorCode;
use serde_json::json;

use crate::auth::{Principal, is_bearer};
use crate::error::ApiError;
use crate::middleware::REQUEST_ID;
use crate::routes::{Route, Upstream};
use crate::state::AppState;
use crate::tokens::IdentityHeaders;

/// Idle upstream connections close before a typical upstream keep-alive (60 s+) would.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ECHO_BODY_LIMIT: usize = 1024 * 1024;

pub const IDENTITY_PREFIX: &str = "x-keyward-";
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Identity headers (six), `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Request-Id` and `Host`.
const ADDED_HEADERS: usize = 10;

thread_local! {
    static CLIENT: Client<HttpConnector, Body> = {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector)
    };
}

/// RFC 9110 §7.6.1's hop-by-hop fields, plus the proxy credentials meant for this hop. As
/// `HeaderName`s, compared without turning each header's name into a string. `Connection`
/// first: [`strip_hop_by_hop`] reads the names it lists.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Bit `n` is set when a name in [`HOP_BY_HOP`] is `n` bytes long: most header names have no
/// such length and need no comparison at all (a test keeps this in step with the list).
const HOP_BY_HOP_LENGTHS: u32 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;

fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let len = name.as_str().len();
    if len >= 32 || HOP_BY_HOP_LENGTHS & (1 << len) == 0 {
        return None;
    }
    HOP_BY_HOP.iter().position(|h| h == name)
}

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names, remembering which hop-by-hop ones are there (a bit each):
    // most requests carry none, and a removal hashes its name.
    let mut present = 0u16;
    for i in headers.keys().filter_map(hop_by_hop_index) {
        present |= 1 << i;
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // `keep-alive` and `close`, what upstreams usually list, need no lookup of their own.
        let mut listed: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for name in value.as_bytes().split(|&b| b == b',') {
                let name = name.trim_ascii();
                if name.eq_ignore_ascii_case(b"keep-alive") || name.eq_ignore_ascii_case(b"close") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(name) {
                    listed.push(name);
                }
            }
        }
        for name in listed {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Drops every header a client could use to impersonate keyward's identity headers, and the
/// `hidden` ones (the key headers, when credentials are hidden): one pass over the names, and
/// a removal (which hashes its name) only for what is there.
pub fn strip_client_headers(headers: &mut HeaderMap, hidden: &[HeaderName]) {
    let unwanted: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(IDENTITY_PREFIX) || hidden.contains(name))
        .cloned()
        .collect();
    for name in unwanted {
        headers.remove(name);
    }
}

/// Sets a verified caller's identity headers (upstream requests, forward-auth answers): the
/// cached set with the signed identity token, or the plain ids when no token can be signed.
pub fn insert_identity(state: &AppState, principal: &Principal, headers: &mut HeaderMap) {
    let signed = state.tokens.as_ref().is_some_and(|tokens| {
        tokens
            .write_identity(principal, principal.at, headers)
            .inspect_err(|e| {
                tracing::warn!(code = e.code.as_str(), "cannot sign the identity token")
            })
            .is_ok()
    });
    if !signed {
        IdentityHeaders::of(principal, None).write_to(headers);
    }
}

pub struct Forward<'a> {
    pub route: &'a Route,
    pub principal: &'a Principal,
    pub upstream_path: &'a str,
    pub client: &'a ClientConn,
    pub request_id: Option<&'a HeaderValue>,
}

/// What stays the same for every request of one client connection: who the peer is, the
/// `X-Forwarded-For` value this hop adds, and the upstream connection reserved for it.
pub struct ClientConn {
    /// The socket peer: what this hop appends to `X-Forwarded-For`.
    pub peer: std::net::SocketAddr,
    pub peer_ip: IpAddr,
    pub peer_trusted: bool,
    forwarded_for: Option<HeaderValue>,
    /// One upstream connection per client connection (PERFORMANCE.md: +9% over a shared
    /// pool); `None` on connections that always use the pool.
    upstream: Option<parking_lot::Mutex<PinnedUpstream>>,
}

#[derive(Default)]
enum PinnedUpstream {
    #[default]
    Empty,
    Idle(Authority, SendRequest<Body>),
    /// A request is using it; a concurrent one (HTTP/2 clients) takes the pool.
    Busy,
}

impl ClientConn {
    /// A client connection that gets its own upstream connection.
    pub fn new(peer: std::net::SocketAddr, state: &AppState) -> Self {
        Self {
            upstream: Some(parking_lot::Mutex::new(PinnedUpstream::Empty)),
            ..Self::pooled(peer, state)
        }
    }

    /// A client connection whose requests use the shared pool (axum-served listeners).
    pub fn pooled(peer: std::net::SocketAddr, state: &AppState) -> Self {
        let peer_ip = keyward_core::ip::canonical(peer.ip());
        Self {
            peer,
            peer_ip,
            peer_trusted: crate::data_plane::is_trusted(state, peer_ip),
            forwarded_for: HeaderValue::from_str(&peer_ip.to_string()).ok(),
            upstream: None,
        }
    }

    /// Takes the pinned connection to `authority` if it is free, or reserves the slot for a
    /// new one (`Some(None)`); `None` when another request holds it.
    fn reserve(&self, authority: &Authority) -> Option<Option<SendRequest<Body>>> {
        let mut slot = self.upstream.as_ref()?.lock();
        match std::mem::replace(&mut *slot, PinnedUpstream::Busy) {
            PinnedUpstream::Busy => None,
            PinnedUpstream::Idle(a, sender) if a == *authority && sender.is_ready() => {
                Some(Some(sender))
            }
            // Another upstream, or a connection that closed: replaced (dropping closes it).
            PinnedUpstream::Idle(..) | PinnedUpstream::Empty => Some(None),
        }
    }

    fn release(&self, kept: Option<(Authority, SendRequest<Body>)>) {
        if let Some(slot) = &self.upstream {
            *slot.lock() = match kept {
                Some((authority, sender)) => PinnedUpstream::Idle(authority, sender),
                None => PinnedUpstream::Empty,
            };
        }
    }
}

/// Frees a reserved slot if the request is cancelled (timeout, client gone) mid-way.
struct Reservation<'a> {
    client: &'a ClientConn,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.client.release(None);
        }
    }
}

fn prepare_headers(state: &AppState, f: &Forward<'_>, headers: &mut HeaderMap) {
    // Room for what is added below at once: the map would otherwise grow (and rehash) two
    // or three times on a request that came with few headers.
    headers.reserve(ADDED_HEADERS);
    strip_hop_by_hop(headers);
    let hide = state.config.auth.hide_credentials;
    let hidden: &[HeaderName] = if hide {
        &state.config.auth.key_headers
    } else {
        &[]
    };
    strip_client_headers(headers, hidden);
    if hide && headers.get(header::AUTHORIZATION).is_some_and(is_bearer) {
        headers.remove(header::AUTHORIZATION);
    }
    insert_identity(state, f.principal, headers);
    // One hash of the name for the lookup and the write.
    match headers.entry(X_FORWARDED_FOR) {
        header::Entry::Occupied(mut sent) => {
            let chain = match sent.get().to_str() {
                Ok(existing) if f.client.peer_trusted => {
                    HeaderValue::from_str(&format!("{existing}, {}", f.client.peer_ip)).ok()
                }
                // From an untrusted peer a client-sent chain is a claim nobody vouched for.
                _ => f.client.forwarded_for.clone(),
            };
            match chain {
                Some(value) => {
                    sent.insert(value);
                }
                None => {
                    sent.remove_entry_mult();
                }
            }
        }
        header::Entry::Vacant(slot) => {
            if let Some(value) = f.client.forwarded_for.clone() {
                slot.insert(value);
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(id) = f.request_id {
        headers.insert(REQUEST_ID, id.clone());
    }
}

type UpstreamResult = Result<Response<Incoming>, ApiError>;

fn upstream_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::UpstreamUnavailable).with_cause(e)
}

/// Through the shared per-thread pool (which wants the absolute URI).
async fn send_pooled(
    mut request: Request,
    scheme: &Scheme,
    authority: &Authority,
) -> UpstreamResult {
    let mut parts = request.uri().clone().into_parts();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    *request.uri_mut() = Uri::from_parts(parts).map_err(upstream_error)?;
    let client = CLIENT.with(Clone::clone);
    client.request(request).await.map_err(upstream_error)
}

async fn connect(authority: &Authority) -> Result<SendRequest<Body>, ApiError> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| upstream_error("connect timed out"))?
    .map_err(upstream_error)?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(upstream_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// Over the client connection's own upstream connection when it is free, else the pool.
async fn send(
    client: &ClientConn,
    request: Request,
    scheme: &Scheme,
    authority: &Authority,
) -> UpstreamResult {
    if *scheme != Scheme::HTTP {
        return send_pooled(request, scheme, authority).await;
    }
    let Some(reserved) = client.reserve(authority) else {
        return send_pooled(request, scheme, authority).await;
    };
    let mut reservation = Reservation {
        client,
        done: false,
    };
    let mut sender = match reserved {
        Some(sender) => sender,
        None => connect(authority).await?,
    };
    let outcome = sender.try_send_request(request).await;
    reservation.done = true;
    match outcome {
        Ok(response) => {
            client.release(Some((authority.clone(), sender)));
            Ok(response)
        }
        Err(mut e) => {
            client.release(None);
            // Not sent at all (the connection closed meanwhile): the pool may still deliver it.
            match e.take_message() {
                Some(request) => send_pooled(request, scheme, authority).await,
                None => Err(upstream_error(e.into_error())),
            }
        }
    }
}

/// Sends the request upstream and streams the answer back.
pub async fn forward(state: &AppState, f: Forward<'_>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    prepare_headers(state, &f, &mut parts.headers);
    match &f.route.upstream {
        Upstream::Echo => {
            let query = parts.uri.query().map(str::to_owned);
            echo(parts, body, f.upstream_path, query.as_deref()).await
        }
        Upstream::Http {
            scheme,
            authority,
            base_path,
        } => {
            let mut path_and_query = String::with_capacity(
                base_path.len()
                    + f.upstream_path.len()
                    + parts.uri.query().map_or(0, |q| q.len() + 1),
            );
            path_and_query.push_str(base_path);
            path_and_query.push_str(f.upstream_path);
            if let Some(q) = parts.uri.query() {
                path_and_query.push('?');
                path_and_query.push_str(q);
            }
            parts.uri = match Uri::try_from(path_and_query) {
                Ok(uri) => uri,
                Err(e) => {
                    return ApiError::new(ErrorCode::InvalidRequest)
                        .with_cause(e)
                        .into_response();
                }
            };
            // Made per request: a value shared by the route would have its reference count
            // written by both workers' cores on every request.
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
            parts.version = Version::HTTP_11;
            let request = Request::from_parts(parts, body);
            let sent = send(f.client, request, scheme, authority);
            match tokio::time::timeout(f.route.timeout, sent).await {
                Err(_) => ApiError::new(ErrorCode::UpstreamTimeout).into_response(),
                Ok(Err(e)) => e.into_response(),
                Ok(Ok(response)) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Response::from_parts(parts, Body::new(body))
                }
            }
        }
    }
}

/// The built-in upstream: answers with the request as an upstream would have received it.
async fn echo(
    parts: axum::http::request::Parts,
    body: Body,
    path: &str,
    query: Option<&str>,
) -> Response {
    let body = match axum::body::to_bytes(body, ECHO_BODY_LIMIT).await {
        Ok(bytes) => bytes,
        Err(_) => return ApiError::new(ErrorCode::PayloadTooLarge).into_response(),
    };
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                json!(String::from_utf8_lossy(value.as_bytes())),
            )
        })
        .collect();
    axum::Json(json!({
        "method": parts.method.as_str(),
        "path": path,
        "query": query,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn every_hop_by_hop_name_has_its_length_bit() {
        for name in &HOP_BY_HOP {
            assert_ne!(HOP_BY_HOP_LENGTHS & (1 << name.as_str().len()), 0, "{name}");
            assert_eq!(hop_by_hop_index(name).map(|i| &HOP_BY_HOP[i]), Some(name));
        }
        let lengths = HOP_BY_HOP
            .iter()
            .fold(0, |bits, name| bits | 1 << name.as_str().len());
        assert_eq!(lengths, HOP_BY_HOP_LENGTHS, "no bit without a name");
        assert_eq!(hop_by_hop_index(&header::USER_AGENT), None);
        assert_eq!(hop_by_hop_index(&header::HOST), None);
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_rest_stays() {
        let mut clean = map(&[("host", "a"), ("accept", "*/*"), ("x-custom", "1")]);
        let before = clean.clone();
        strip_hop_by_hop(&mut clean);
        assert_eq!(clean, before);

        for name in &HOP_BY_HOP {
            let mut headers = map(&[("host", "a"), ("x-custom", "1")]);
            headers.insert(name.clone(), HeaderValue::from_static("v"));
            strip_hop_by_hop(&mut headers);
            assert_eq!(headers, map(&[("host", "a"), ("x-custom", "1")]), "{name}");
        }

        let mut listed = map(&[
            ("host", "a"),
            ("connection", "keep-alive, X-Drop-Me"),
            ("x-drop-me", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("accept", "*/*"),
        ]);
        listed.append(header::CONNECTION, HeaderValue::from_static("x-also"));
        listed.insert("x-also", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut listed);
        assert_eq!(listed, map(&[("host", "a"), ("accept", "*/*")]));
    }
}
