//! Configuration: `keyward.toml` and `KEYWARD_<SECTION>__<KEY>` environment variables.
//!
//! Precedence: built-in defaults < `keyward.toml` (or `--config`) < `KEYWARD_*` environment.
//! Every key is read on its own, so [`load`] reports every invalid or unknown key at once,
//! each with its path, instead of stopping at the first.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider};
use ipnet::IpNet;
use keyward_core::ErrorCode;
use keyward_core::ip;
use keyward_core::key_format::{self, KeyFormat, PrefixTemplate};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Environment variables that start with `KEYWARD_` but are not configuration keys.
const NON_CONFIG_ENV: &[&str] = &["master_key", "api_key", "config", "log"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub internal_listen: SocketAddr,
    pub mode: Mode,
    pub trusted_proxies: Vec<IpNet>,
    pub public_origin: String,
    /// Single-threaded runtimes to serve on; 0 means one per core.
    pub workers: usize,
    /// Where keyward keeps files of its own (the generated master key).
    pub data_dir: PathBuf,
    /// Pin each worker runtime to one core.
    pub pin_workers: bool,
    /// A client that has not sent a request's headers this long after the connection opened
    /// or its previous request ended is disconnected (slow or idle clients hold no sockets).
    pub header_read_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TokenAlgorithm {
    EdDSA,
    HS256,
}

/// `[tokens]`: the key → JWT exchange (DESIGN.md section 3).
#[derive(Clone)]
pub struct TokensConfig {
    pub ttl_seconds: u64,
    pub algorithm: TokenAlgorithm,
    /// Only for HS256; at least 32 bytes.
    pub hs256_secret: Option<String>,
    pub issuer: String,
    pub audience: String,
    pub exchange_path: String,
    /// Sign `X-Keyward-Identity` for upstreams and forward-auth answers; without it they get
    /// the plain identity headers only (for upstreams that trust the path the request took).
    pub identity_token: bool,
}

#[derive(Debug, Clone)]
pub struct KeysConfig {
    pub prefix: PrefixTemplate,
    pub format: KeyFormat,
    /// Every scope a key may carry.
    pub scopes: Vec<String>,
    /// Scopes a new key gets when its creator names none.
    pub default_scopes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitBackend {
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendError {
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub per_minute: u32,
    pub per_hour: u32,
}

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub backend: RateLimitBackend,
    pub url: Option<String>,
    pub on_backend_error: OnBackendError,
    pub draft_headers: bool,
    pub tiers: BTreeMap<String, Tier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorStyle {
    Nested,
    Flat,
}

/// `[errors.codes.<code>]`: rename a code or replace its message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeOverride {
    pub code: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ErrorsConfig {
    pub style: ErrorStyle,
    pub codes: HashMap<ErrorCode, CodeOverride>,
}

/// Name of the built-in upstream that answers with the request it received.
pub const ECHO_UPSTREAM: &str = "builtin:echo";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    pub path: String,
    pub upstream: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default = "default_cost")]
    pub cost: u32,
    #[serde(default)]
    pub strip_prefix: bool,
    /// Seconds to wait for the upstream's response headers.
    pub timeout: Option<u64>,
}

fn default_cost() -> u32 {
    1
}

/// How clients present keys, and whether upstreams see them.
#[derive(Clone)]
pub struct AuthConfig {
    /// Accept `Authorization: Bearer <key>`.
    pub bearer: bool,
    /// Headers that carry the bare key (lower case), e.g. `x-api-key`.
    /// Parsed once: the hot path looks them up per request.
    pub key_headers: Vec<axum::http::HeaderName>,
    /// Remove the credential before proxying.
    pub hide_credentials: bool,
    /// HS256 secret of proxy-auth JWTs from a trusted frontend (internal listener only).
    pub proxy_jwt_secret: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CorsConfig {
    /// Allowed origins; empty allows any origin (without credentials).
    pub origins: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct UsageConfig {
    pub flush_seconds: u64,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub negative_capacity: usize,
    pub negative_ttl_seconds: u64,
    /// Store queries that found nothing and access tokens whose signature did not check out,
    /// per client (IPv4 address, IPv6 /64) and minute (0: no bound).
    pub unknown_keys_per_client: u32,
    /// Store queries that found nothing on this node per minute, past which only keys whose
    /// hash is stored are queried (0: no bound).
    pub unknown_keys_per_node: u32,
    /// Forged token signatures on this node per minute, past which a new token is checked
    /// only if the key it names is cached and has few failures (0: no bound).
    pub forged_tokens_per_node: u32,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub store_url: String,
    pub keys: KeysConfig,
    pub ratelimit: RateLimitConfig,
    pub errors: ErrorsConfig,
    pub routes: Vec<RouteConfig>,
    pub auth: AuthConfig,
    pub cors: CorsConfig,
    pub usage: UsageConfig,
    pub cache: CacheConfig,
    pub tokens: TokensConfig,
    pub log: LogConfig,
}

impl Config {
    pub fn route(&self, name: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.name == name)
    }
}

// Hand-written so that `{:?}` of the configuration never prints a secret.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("bearer", &self.bearer)
            .field("key_headers", &self.key_headers)
            .field("hide_credentials", &self.hide_credentials)
            .field(
                "proxy_jwt_secret",
                &self.proxy_jwt_secret.as_ref().map(|_| "…"),
            )
            .finish()
    }
}

impl fmt::Debug for TokensConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokensConfig")
            .field("ttl_seconds", &self.ttl_seconds)
            .field("algorithm", &self.algorithm)
            .field("hs256_secret", &self.hs256_secret.as_ref().map(|_| "…"))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("exchange_path", &self.exchange_path)
            .field("identity_token", &self.identity_token)
            .finish()
    }
}

/// One problem with one configuration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The file keyward reads when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG_FILE: &str = "keyward.toml";

/// Parses configuration from TOML text alone (no environment): for tests and tools.
pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
    build(&Figment::new().merge(Toml::string(text)))
}

/// Loads defaults, then the file, then the environment.
pub fn load(explicit_file: Option<&Path>) -> Result<Config, ConfigErrors> {
    let file: Option<PathBuf> = match explicit_file {
        Some(path) if !path.exists() => {
            return Err(ConfigErrors(vec![ConfigError {
                path: String::new(),
                message: format!("config file {} does not exist", path.display()),
            }]));
        }
        Some(path) => Some(path.to_owned()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
    };
    let mut figment = Figment::new();
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    let figment = figment.merge(Env::prefixed("KEYWARD_").ignore(NON_CONFIG_ENV).split("__"));
    build(&figment)
}

/// Reads one key at a time, collecting every problem.
struct Reader<'a> {
    figment: &'a Figment,
    errors: Vec<ConfigError>,
}

impl Reader<'_> {
    fn get<T: DeserializeOwned>(&mut self, path: &str, default: T) -> T {
        if self.figment.find_value(path).is_err() {
            return default;
        }
        match self.figment.extract_inner::<T>(path) {
            Ok(value) => value,
            Err(e) => {
                let source = self
                    .figment
                    .find_metadata(path)
                    .map(|m| format!(" (from {})", m.name))
                    .unwrap_or_default();
                // figment's messages quote the value found; a secret must not reach stderr.
                let message = if SECRET_KEYS.contains(&path) {
                    "invalid value (not shown: this key holds a secret)".to_owned()
                } else {
                    e.kind.to_string()
                };
                self.fail(path, format!("{message}{source}"));
                default
            }
        }
    }

    fn fail(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }
}

/// Keys whose values are secrets (or may embed one): never echoed in an error.
const SECRET_KEYS: &[&str] = &[
    "tokens.hs256_secret",
    "auth.proxy_jwt_secret",
    "store.url",
    "ratelimit.url",
];

/// Keys that hold a whole table or list, validated as one value.
const KNOWN_KEYS: &[&str] = &[
    "server.listen",
    "server.internal_listen",
    "server.mode",
    "server.trusted_proxies",
    "server.public_origin",
    "server.workers",
    "server.data_dir",
    "server.pin_workers",
    "server.header_read_timeout",
    "tokens.ttl_seconds",
    "tokens.algorithm",
    "tokens.hs256_secret",
    "tokens.issuer",
    "tokens.audience",
    "tokens.exchange_path",
    "tokens.identity_token",
    "store.url",
    "keys.prefix",
    "keys.random_length",
    "keys.checksum",
    "keys.scopes",
    "keys.default_scopes",
    "ratelimit.backend",
    "ratelimit.url",
    "ratelimit.on_backend_error",
    "ratelimit.draft_headers",
    "ratelimit.tiers",
    "errors.style",
    "errors.codes",
    "routes",
    "auth.bearer",
    "auth.key_headers",
    "auth.hide_credentials",
    "auth.proxy_jwt_secret",
    "cors.origins",
    "usage.flush_seconds",
    "cache.negative_capacity",
    "cache.negative_ttl_seconds",
    "cache.unknown_keys_per_client",
    "cache.unknown_keys_per_node",
    "cache.forged_tokens_per_node",
    "log.format",
    "log.level",
];

fn collect_leaves(prefix: &str, dict: &Dict, out: &mut Vec<String>) {
    for (key, value) in dict {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Dict(_, inner) if !KNOWN_KEYS.contains(&path.as_str()) => {
                collect_leaves(&path, inner, out)
            }
            _ => out.push(path),
        }
    }
}

fn default_tiers() -> BTreeMap<String, Tier> {
    BTreeMap::from([
        (
            "free".to_owned(),
            Tier {
                per_minute: 60,
                per_hour: 1_000,
            },
        ),
        (
            "pro".to_owned(),
            Tier {
                per_minute: 120,
                per_hour: 5_000,
            },
        ),
        (
            "enterprise".to_owned(),
            Tier {
                per_minute: 300,
                per_hour: 20_000,
            },
        ),
    ])
}

fn default_routes() -> Vec<RouteConfig> {
    vec![RouteConfig {
        name: "echo".into(),
        path: "/echo/".into(),
        upstream: ECHO_UPSTREAM.into(),
        scopes: vec!["inference".into()],
        cost: 1,
        strip_prefix: true,
        timeout: None,
    }]
}

fn is_valid_scope(scope: &str) -> bool {
    !scope.is_empty()
        && scope.len() <= 64
        && scope
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn addr(r: &mut Reader<'_>, path: &str, default: &str) -> SocketAddr {
    let raw: String = r.get(path, default.to_owned());
    match raw.parse() {
        Ok(a) => a,
        Err(_) => {
            r.fail(
                path,
                format!("`{raw}` is not a socket address like 127.0.0.1:8080"),
            );
            default
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
        }
    }
}

fn build(figment: &Figment) -> Result<Config, ConfigErrors> {
    let mut r = Reader {
        figment,
        errors: Vec::new(),
    };

    match figment.data() {
        Ok(profiles) => {
            let mut leaves = Vec::new();
            for dict in profiles.values() {
                collect_leaves("", dict, &mut leaves);
            }
            for leaf in leaves {
                if !KNOWN_KEYS.contains(&leaf.as_str()) {
                    r.fail(&leaf, "unknown configuration key");
                }
            }
        }
        // A syntax error quotes the offending line, which may hold a secret: keep only the
        // position and the reason.
        Err(e) => r.fail(
            "",
            e.to_string()
                .lines()
                .filter(|l| !l.contains('|') && !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join(" "),
        ),
    }

    let listen = addr(&mut r, "server.listen", "127.0.0.1:8080");
    let internal_listen = addr(&mut r, "server.internal_listen", "127.0.0.1:8081");
    let mode = r.get("server.mode", Mode::Development);
    let proxies: Vec<String> = r.get("server.trusted_proxies", Vec::new());
    let mut trusted_proxies = Vec::new();
    for (i, p) in proxies.iter().enumerate() {
        match ip::parse_rule(p) {
            Ok(net) => trusted_proxies.push(net),
            Err(message) => r.fail(&format!("server.trusted_proxies[{i}]"), message),
        }
    }
    let public_origin: String = r.get("server.public_origin", "http://localhost:8080".to_owned());
    if !(public_origin.starts_with("http://") || public_origin.starts_with("https://")) {
        r.fail(
            "server.public_origin",
            "must start with http:// or https://",
        );
    }
    let data_dir: PathBuf = r.get("server.data_dir", PathBuf::from("keyward-data"));
    let workers: usize = r.get("server.workers", 0);
    let pin_workers: bool = r.get("server.pin_workers", true);
    if workers > 256 {
        r.fail("server.workers", "at most 256");
    }
    let header_read_timeout: u64 = r.get("server.header_read_timeout", 30);
    if !(1..=3600).contains(&header_read_timeout) {
        r.fail(
            "server.header_read_timeout",
            "must be between 1 and 3600 (seconds)",
        );
    }

    let store_url: String = r.get("store.url", "sqlite://keyward-data/keyward.db".to_owned());
    if !["sqlite:", "postgres://", "postgresql://"]
        .iter()
        .any(|scheme| store_url.starts_with(scheme))
    {
        r.fail("store.url", "must start with sqlite: or postgres://");
    }

    let prefix_raw: String = r.get("keys.prefix", "kw_{env}_".to_owned());
    let prefix = PrefixTemplate::parse(&prefix_raw).unwrap_or_else(|message| {
        r.fail("keys.prefix", message);
        PrefixTemplate::default()
    });
    let random_length: usize = r.get("keys.random_length", 43);
    if !(key_format::MIN_RANDOM_LENGTH..=key_format::MAX_RANDOM_LENGTH).contains(&random_length) {
        r.fail(
            "keys.random_length",
            format!(
                "must be between {} and {}",
                key_format::MIN_RANDOM_LENGTH,
                key_format::MAX_RANDOM_LENGTH
            ),
        );
    }
    let checksum: bool = r.get("keys.checksum", true);
    let default_scope_list = ["inference", "management", "execution", "research"];
    let scopes: Vec<String> = r.get(
        "keys.scopes",
        default_scope_list.iter().map(|s| (*s).to_owned()).collect(),
    );
    for (i, s) in scopes.iter().enumerate() {
        if !is_valid_scope(s) {
            r.fail(
                &format!("keys.scopes[{i}]"),
                format!("`{s}` is not a valid scope (letters, digits, `_-.:`, at most 64)"),
            );
        }
    }
    let default_scopes: Vec<String> = r.get("keys.default_scopes", vec!["inference".to_owned()]);
    for (i, s) in default_scopes.iter().enumerate() {
        if !scopes.contains(s) {
            r.fail(
                &format!("keys.default_scopes[{i}]"),
                format!("`{s}` is not listed in keys.scopes"),
            );
        }
    }

    let backend = r.get("ratelimit.backend", RateLimitBackend::Memory);
    let url: Option<String> = r.get("ratelimit.url", None);
    if backend == RateLimitBackend::Redis
        && !url
            .as_deref()
            .is_some_and(|u| u.starts_with("redis://") || u.starts_with("rediss://"))
    {
        r.fail(
            "ratelimit.url",
            "the redis backend needs url = \"redis://…\"",
        );
    }
    let on_backend_error = r.get("ratelimit.on_backend_error", OnBackendError::Local);
    let draft_headers = r.get("ratelimit.draft_headers", false);
    let tiers: BTreeMap<String, Tier> = r.get("ratelimit.tiers", default_tiers());
    for (name, tier) in &tiers {
        if tier.per_minute == 0 || tier.per_hour == 0 {
            r.fail(
                &format!("ratelimit.tiers.{name}"),
                "limits must be at least 1",
            );
        }
    }

    let style = r.get("errors.style", ErrorStyle::Nested);
    let raw_codes: BTreeMap<String, CodeOverride> = r.get("errors.codes", BTreeMap::new());
    let mut codes = HashMap::new();
    for (name, o) in raw_codes {
        match ErrorCode::from_code(&name) {
            Some(code) => {
                codes.insert(code, o);
            }
            None => r.fail(&format!("errors.codes.{name}"), "unknown error code"),
        }
    }

    let routes: Vec<RouteConfig> = r.get("routes", default_routes());
    let mut names = std::collections::HashSet::new();
    for (i, route) in routes.iter().enumerate() {
        let at = |field: &str| format!("routes[{i}].{field}");
        if route.name.is_empty() || !names.insert(route.name.clone()) {
            r.fail(&at("name"), "must be non-empty and unique");
        }
        match keyward_core::path::normalize(&route.path) {
            Ok(normalized)
                if normalized == route.path || format!("{normalized}/") == route.path => {}
            _ => r.fail(
                &at("path"),
                "must be a normalised absolute path such as /v1/chat/",
            ),
        }
        if route.timeout == Some(0) {
            r.fail(&at("timeout"), "must be at least 1 second");
        }
        let upstream_ok = route.upstream == ECHO_UPSTREAM
            || (route.upstream.starts_with("http://")
                && route
                    .upstream
                    .parse::<axum::http::Uri>()
                    .is_ok_and(|u| u.authority().is_some() && u.query().is_none()));
        if !upstream_ok {
            r.fail(
                &at("upstream"),
                format!("must be an http:// URL (https upstreams are not supported yet) or {ECHO_UPSTREAM}"),
            );
        }
        for s in &route.scopes {
            if !scopes.contains(s) {
                r.fail(&at("scopes"), format!("`{s}` is not listed in keys.scopes"));
            }
        }
        if route.cost == 0 {
            r.fail(&at("cost"), "must be at least 1");
        }
    }

    let bearer = r.get("auth.bearer", true);
    let key_headers: Vec<String> = r.get("auth.key_headers", vec!["x-api-key".to_owned()]);
    let key_headers: Vec<String> = key_headers.iter().map(|h| h.to_ascii_lowercase()).collect();
    let mut key_header_names = Vec::with_capacity(key_headers.len());
    for (i, h) in key_headers.iter().enumerate() {
        match axum::http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) if name != axum::http::header::AUTHORIZATION => key_header_names.push(name),
            _ => r.fail(
                &format!("auth.key_headers[{i}]"),
                "must be a header name other than authorization",
            ),
        }
    }
    let key_headers = key_header_names;
    if !bearer && key_headers.is_empty() {
        r.fail(
            "auth.key_headers",
            "with auth.bearer = false at least one key header is needed",
        );
    }
    let hide_credentials = r.get("auth.hide_credentials", true);
    let proxy_jwt_secret: Option<String> = r.get("auth.proxy_jwt_secret", None);
    if proxy_jwt_secret.as_ref().is_some_and(|s| s.len() < 32) {
        r.fail("auth.proxy_jwt_secret", "needs at least 32 bytes");
    }
    let origins: Vec<String> = r.get("cors.origins", Vec::new());
    for (i, o) in origins.iter().enumerate() {
        if axum::http::HeaderValue::from_str(o).is_err()
            || !(o.starts_with("http://") || o.starts_with("https://"))
        {
            r.fail(
                &format!("cors.origins[{i}]"),
                "must be an origin such as https://app.example.com",
            );
        }
    }
    let flush_seconds: u64 = r.get("usage.flush_seconds", 10);
    if !(1..=3600).contains(&flush_seconds) {
        r.fail("usage.flush_seconds", "must be between 1 and 3600");
    }
    let negative_capacity: usize = r.get("cache.negative_capacity", 100_000);
    if negative_capacity == 0 {
        r.fail("cache.negative_capacity", "must be at least 1");
    }
    let negative_ttl_seconds: u64 = r.get("cache.negative_ttl_seconds", 60);
    let unknown_keys_per_client: u32 = r.get("cache.unknown_keys_per_client", 1_000);
    let unknown_keys_per_node: u32 = r.get("cache.unknown_keys_per_node", 10_000);
    let forged_tokens_per_node: u32 = r.get("cache.forged_tokens_per_node", 10_000);

    let ttl_seconds: u64 = r.get("tokens.ttl_seconds", 900);
    if !(60..=3600).contains(&ttl_seconds) {
        r.fail("tokens.ttl_seconds", "must be between 60 and 3600");
    }
    let algorithm = r.get("tokens.algorithm", TokenAlgorithm::EdDSA);
    let hs256_secret: Option<String> = r.get("tokens.hs256_secret", None);
    if algorithm == TokenAlgorithm::HS256 && hs256_secret.as_ref().is_none_or(|s| s.len() < 32) {
        r.fail(
            "tokens.hs256_secret",
            "HS256 needs a secret of at least 32 bytes",
        );
    }
    let issuer: String = r.get("tokens.issuer", public_origin.clone());
    if hs256_secret.is_some()
        && hs256_secret == r.get::<Option<String>>("auth.proxy_jwt_secret", None)
    {
        r.fail(
            "auth.proxy_jwt_secret",
            "must differ from tokens.hs256_secret",
        );
    }
    let audience: String = r.get("tokens.audience", "keyward".to_owned());
    let exchange_path: String = r.get("tokens.exchange_path", "/v1/tokens/exchange".to_owned());
    let own_paths = [
        "/v1/keys",
        "/v1/projects",
        "/v1/org",
        "/v1/audit-log",
        "/v1/auth",
        "/v1/verify",
        "/.well-known/jwks.json",
    ];
    if !exchange_path.starts_with('/')
        || keyward_core::path::normalize(&exchange_path)
            .ok()
            .as_deref()
            != Some(exchange_path.as_str())
        || own_paths
            .iter()
            .any(|p| exchange_path == *p || exchange_path.starts_with(&format!("{p}/")))
    {
        r.fail(
            "tokens.exchange_path",
            "must be a normalised absolute path that is not one of keyward's own",
        );
    }

    let identity_token = r.get("tokens.identity_token", true);

    let log_format = r.get("log.format", LogFormat::Text);
    let log_level: String = r.get("log.level", "info".to_owned());

    if !r.errors.is_empty() {
        return Err(ConfigErrors(r.errors));
    }
    Ok(Config {
        server: ServerConfig {
            listen,
            internal_listen,
            mode,
            trusted_proxies,
            public_origin,
            workers,
            data_dir,
            pin_workers,
            header_read_timeout: std::time::Duration::from_secs(header_read_timeout),
        },
        store_url,
        keys: KeysConfig {
            prefix,
            format: KeyFormat {
                random_length,
                checksum,
            },
            scopes,
            default_scopes,
        },
        ratelimit: RateLimitConfig {
            backend,
            url,
            on_backend_error,
            draft_headers,
            tiers,
        },
        errors: ErrorsConfig { style, codes },
        routes,
        auth: AuthConfig {
            bearer,
            key_headers,
            hide_credentials,
            proxy_jwt_secret,
        },
        cors: CorsConfig { origins },
        usage: UsageConfig { flush_seconds },
        cache: CacheConfig {
            negative_capacity,
            negative_ttl_seconds,
            unknown_keys_per_client,
            unknown_keys_per_node,
            forged_tokens_per_node,
        },
        tokens: TokensConfig {
            ttl_seconds,
            algorithm,
            hs256_secret,
            issuer,
            audience,
            exchange_path,
            identity_token,
        },
        log: LogConfig {
            format: log_format,
            level: log_level,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::from_toml_str as from_toml;

    #[test]
    fn defaults_are_valid() {
        let c = from_toml("").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.keys.format, KeyFormat::default());
        assert_eq!(c.ratelimit.tiers["pro"].per_hour, 5_000);
        assert_eq!(c.routes[0].path, "/echo/");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let errors = from_toml(
            r#"
            [server]
            listen = "nope"
            mode = "staging"
            trusted_proxies = ["10.0.0.0/8", "bad"]
            [keys]
            prefix = "kw {env}"
            random_length = 4
            [ratelimit]
            backend = "redis"
            [errors.codes.no_such_code]
            message = "x"
            [typo]
            a = 1
            "#,
        )
        .unwrap_err();
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "typo.a",
            "server.listen",
            "server.mode",
            "server.trusted_proxies[1]",
            "keys.prefix",
            "keys.random_length",
            "ratelimit.url",
            "errors.codes.no_such_code",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
        assert_eq!(paths.len(), 8, "{paths:?}");
    }

    #[test]
    fn secrets_never_appear_in_errors_or_debug_output() {
        let errors = from_toml("[tokens]\nhs256_secret = [\"s3cr3t-in-a-list\"]\n").unwrap_err();
        let text = errors.to_string();
        assert!(text.contains("tokens.hs256_secret"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        let syntax = from_toml("[auth]\nproxy_jwt_secret = \"s3cr3t-unterminated\n").unwrap_err();
        let text = syntax.to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        let config = from_toml(
            "[tokens]\nalgorithm = \"HS256\"\nhs256_secret = \"s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t\"\n",
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("s3cr3t"));
    }
}
