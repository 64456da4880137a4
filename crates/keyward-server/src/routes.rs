//! The configured routes, ready for longest-prefix matching on normalised paths.

use std::sync::Arc;
use std::time::Duration;

use axum::http::Uri;
use keyward_core::path;

use crate::config::{ECHO_UPSTREAM, RouteConfig};

pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub enum Upstream {
    /// The built-in upstream that answers with the request it received.
    Echo,
    Http {
        scheme: axum::http::uri::Scheme,
        authority: axum::http::uri::Authority,
        /// Path prefix of the upstream base URL, without a trailing slash.
        base_path: String,
    },
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub prefix: String,
    /// Segments of the prefix: what `strip_prefix` removes, and the longest match wins.
    pub segments: usize,
    pub upstream: Upstream,
    pub scopes: Vec<String>,
    pub cost: u32,
    pub strip_prefix: bool,
    pub timeout: Duration,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    /// Most specific first.
    routes: Vec<Route>,
}

impl RouteTable {
    /// Builds from validated configuration; a route whose upstream does not parse is skipped
    /// (config validation refuses such routes before this runs).
    pub fn new(configs: &[RouteConfig]) -> Self {
        let mut routes: Vec<Route> = configs
            .iter()
            .filter_map(|c| {
                let upstream = if c.upstream == ECHO_UPSTREAM {
                    Upstream::Echo
                } else {
                    let uri: Uri = c.upstream.parse().ok()?;
                    let parts = uri.into_parts();
                    Upstream::Http {
                        scheme: parts.scheme?,
                        authority: parts.authority?,
                        base_path: parts
                            .path_and_query
                            .map(|p| p.path().trim_end_matches('/').to_owned())
                            .unwrap_or_default(),
                    }
                };
                Some(Route {
                    name: Arc::from(c.name.as_str()),
                    prefix: c.path.clone(),
                    segments: path::specificity(&c.path),
                    upstream,
                    scopes: c.scopes.clone(),
                    cost: c.cost,
                    strip_prefix: c.strip_prefix,
                    timeout: c
                        .timeout
                        .map(Duration::from_secs)
                        .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT),
                })
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.segments));
        Self { routes }
    }

    /// The most specific route covering a normalised path.
    pub fn find(&self, normalized_path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| path::prefix_matches(&r.prefix, normalized_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, path: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            path: path.into(),
            upstream: "http://127.0.0.1:9/base/".into(),
            scopes: vec![],
            cost: 1,
            strip_prefix: false,
            timeout: None,
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let t = RouteTable::new(&[
            route("all", "/"),
            route("v1", "/v1/"),
            route("admin", "/v1/admin/"),
        ]);
        let name = |p: &str| t.find(p).map(|r| r.name.to_string());
        assert_eq!(name("/v1/admin/users").as_deref(), Some("admin"));
        assert_eq!(name("/V1/Admin./users").as_deref(), Some("admin"));
        assert_eq!(name("/v1/other").as_deref(), Some("v1"));
        assert_eq!(name("/x").as_deref(), Some("all"));
        let Some(Route {
            upstream: Upstream::Http { base_path, .. },
            ..
        }) = t.find("/x")
        else {
            panic!("http upstream expected")
        };
        assert_eq!(base_path, "/base");
    }
}
