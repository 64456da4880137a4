//! Extractors that answer in the error envelope: JSON bodies, query strings, the client IP.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use keyward_core::ErrorCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// Request bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A JSON body. Malformed JSON → 400 `invalid_json`; an unknown field → 400 `unknown_field`;
/// a wrong type → 400 `invalid_request`; a body that is not JSON → 415; too large → 413.
/// Messages name the field but never echo the value sent.
pub struct ApiJson<T>(pub T);

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json")
                || (mime.len() > 5 && mime[mime.len() - 5..].eq_ignore_ascii_case("+json"))
        })
}

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let has_json_type = is_json(req.headers());
        let has_type = req.headers().contains_key(header::CONTENT_TYPE);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge)
            } else {
                ApiError::new(ErrorCode::InvalidRequest)
                    .with_message("The request body could not be read.")
            }
        })?;
        // An empty body without a content type stands for `{}` (e.g. `POST /v1/keys`).
        let bytes = if bytes.is_empty() && !has_type {
            Bytes::from_static(b"{}")
        } else if !has_json_type {
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType));
        } else {
            bytes
        };
        parse_json(&bytes).map(ApiJson)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end()
        .map_err(|_| ApiError::new(ErrorCode::InvalidJson))?;
    Ok(value)
}

fn json_error(error: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::new(ErrorCode::InvalidJson).with_message(format!(
                "The request body is not valid JSON (line {}, column {}).",
                inner.line(),
                inner.column()
            ))
        }
        _ => {
            let text = inner.to_string();
            if let Some(rest) = text.strip_prefix("unknown field `") {
                let field = rest.split('`').next().unwrap_or_default();
                // serde_path_to_error's path already ends with the unknown field.
                let param = if path == "." || path.is_empty() {
                    field.to_owned()
                } else {
                    path
                };
                ApiError::new(ErrorCode::UnknownField)
                    .with_message(format!("Unknown field `{param}`."))
                    .with_param(param)
            } else {
                // serde says "invalid type: string \"…\", expected u32": keep only what was
                // expected, never the value that was sent.
                let expected = text
                    .split_once("expected ")
                    .map(|(_, e)| e.split(" at line").next().unwrap_or(e).to_owned());
                let message = match (&expected, text.starts_with("missing field")) {
                    (_, true) => text
                        .split(" at line")
                        .next()
                        .unwrap_or("missing field")
                        .to_owned(),
                    (Some(e), _) => format!("`{path}` has the wrong type: expected {e}."),
                    (None, _) => format!("`{path}` is invalid."),
                };
                ApiError::new(ErrorCode::InvalidRequest)
                    .with_message(message)
                    .with_param(path)
            }
        }
    }
}

/// A query string; unknown or ill-typed parameters → 400 `invalid_request`.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| {
                let detail = e.body_text();
                let detail = detail
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&detail);
                ApiError::new(ErrorCode::InvalidRequest)
                    .with_message(format!("Invalid query string: {detail}."))
            })
    }
}

/// The client's address: the socket peer, or what `X-Forwarded-For` / `Forwarded` say when the
/// peer is a trusted proxy (walking right to left past every trusted hop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
            .ok_or_else(|| ApiError::internal("connection info missing"))?;
        Ok(ClientIp(client_ip(
            peer,
            &parts.headers,
            &state.config.server.trusted_proxies,
        )))
    }
}

pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let peer = keyward_core::ip::canonical(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all(header::FORWARDED) {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        for element in text.split(',') {
            for pair in element.split(';') {
                if let Some((name, v)) = pair.trim().split_once('=')
                    && name.trim().eq_ignore_ascii_case("for")
                {
                    let v = v.trim().trim_matches('"');
                    let v = v
                        .strip_prefix('[')
                        .map_or(v, |s| s.split(']').next().unwrap_or(s));
                    let v = if v.matches(':').count() == 1 {
                        v.split(':').next().unwrap_or(v)
                    } else {
                        v
                    };
                    match v.parse() {
                        Ok(ip) => hops.push(keyward_core::ip::canonical(ip)),
                        Err(_) => return peer,
                    }
                }
            }
        }
    }
    if hops.is_empty() {
        for value in headers.get_all("x-forwarded-for") {
            let Ok(text) = value.to_str() else {
                return peer;
            };
            for part in text.split(',') {
                match part.trim().parse() {
                    Ok(ip) => hops.push(keyward_core::ip::canonical(ip)),
                    Err(_) => return peer,
                }
            }
        }
    }
    hops.into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn forwarded_headers_only_count_from_trusted_proxies() {
        let trusted = vec![keyward_core::ip::parse_rule("10.0.0.0/8").unwrap()];
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "192.0.2.9".parse().unwrap();
        let xff = headers(&[("x-forwarded-for", "198.51.100.7, 10.0.0.2")]);
        assert_eq!(client_ip(stranger, &xff, &trusted), stranger);
        assert_eq!(
            client_ip(proxy, &xff, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // A client cannot pick its address by prepending to the header.
        let spoof = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.7")]);
        assert_eq!(
            client_ip(proxy, &spoof, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        let fwd = headers(&[(
            "forwarded",
            "for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.3",
        )]);
        assert_eq!(
            client_ip(proxy, &fwd, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        let garbage = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(client_ip(proxy, &garbage, &trusted), proxy);
    }
}
