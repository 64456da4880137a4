//! Keyward's JWTs (DESIGN.md section 3): API keys exchanged for short-lived access tokens,
//! verified without a storage lookup wherever a key is accepted.
//!
//! - Ed25519 (`EdDSA`) by default, each key with a `kid`; public keys at
//!   `/.well-known/jwks.json`; private keys stored encrypted with the master key.
//! - `HS256` with `tokens.hs256_secret` as an option (no JWKS then).
//! - The algorithm is fixed by configuration: a token's `alg` header must equal it, and its
//!   `kid` only selects among keyward's own keys, so `none` and HS256-signed-with-the-public-key
//!   are refused. Each kind of token has its own `typ` and `aud`, so none stands in for another.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use keyward_core::ids::KeyId;
use keyward_core::key_format::KeyHash;
use keyward_core::{ErrorCode, Timestamp};
use keyward_store::{SigningKeyRecord, Store};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::Principal;
use crate::config::{TokenAlgorithm, TokensConfig};
use crate::error::{ApiError, ApiResult};
use crate::master_key::MasterKey;

/// `typ` of an access token from the exchange.
pub const ACCESS_TYP: &str = "kw-access+jwt";
/// `typ` of the identity token sent to upstreams.
pub const IDENTITY_TYP: &str = "kw-identity+jwt";
/// Tokens are accepted up to this long past `exp` (clock skew).
pub const LEEWAY_SECS: u64 = 30;
/// The longest token lifetime; retired public keys stay published this long (plus leeway).
pub const MAX_TTL_SECS: i64 = 3600;
pub const IDENTITY_TTL_SECS: i64 = 60;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub org_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub project_id: String,
    pub key_id: String,
    pub scopes: Vec<String>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

/// Claims of the identity token sent upstream.
#[derive(Debug, Clone, Serialize)]
struct IdentityClaims {
    iss: String,
    sub: String,
    aud: String,
    org_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    project_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    scopes: Vec<String>,
    iat: i64,
    nbf: i64,
    exp: i64,
    jti: String,
}

/// The key tokens are signed with.
enum Signer {
    Hs256(EncodingKey),
    /// Kept expanded: `jsonwebtoken::encode` parses a PKCS#8 key and derives its public half
    /// (a scalar multiplication) on every call, 41 µs per identity token against 19 µs.
    Ed25519(Box<ed25519_dalek::SigningKey>),
}

impl Signer {
    fn sign<T: Serialize>(&self, header: &Header, claims: &T) -> ApiResult<String> {
        match self {
            Self::Hs256(key) => {
                jsonwebtoken::encode(header, claims, key).map_err(ApiError::internal)
            }
            Self::Ed25519(key) => {
                use ed25519_dalek::Signer as _;
                let header = serde_json::to_vec(header).map_err(ApiError::internal)?;
                let claims = serde_json::to_vec(claims).map_err(ApiError::internal)?;
                let mut token = String::with_capacity(512);
                URL_SAFE_NO_PAD.encode_string(header, &mut token);
                token.push('.');
                URL_SAFE_NO_PAD.encode_string(claims, &mut token);
                let signature = key.sign(token.as_bytes());
                token.push('.');
                URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut token);
                Ok(token)
            }
        }
    }
}

struct Verifier {
    key: DecodingKey,
    public_x: Option<String>,
    /// Published and accepted until then (None: active).
    valid_until: Option<Timestamp>,
}

struct Keys {
    signing: Option<(String, Signer)>,
    verifiers: HashMap<String, Verifier>,
}

/// Claims of a proxy-auth JWT minted by a trusted frontend for one of its users.
#[derive(Debug, Clone, Deserialize)]
pub struct ProxyClaims {
    pub sub: String,
    pub org_id: String,
    pub project_id: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub iat: i64,
    pub exp: i64,
}

/// Proxy-auth tokens live at most this long (`exp - iat`).
pub const PROXY_MAX_TTL_SECS: i64 = 60;

/// An access token that verified: the key it stands for and its claims.
#[derive(Debug)]
pub struct VerifiedAccess {
    pub key_id: KeyId,
    pub claims: AccessClaims,
}

/// Verified access tokens remembered at most; past it the memory starts over.
const VERIFIED_CAPACITY: usize = 100_000;

/// How long a token stays remembered after it expired: replaying it costs a lookup, not a
/// signature check.
const EXPIRED_REMEMBERED_SECS: i64 = 3600;

/// What the memory of checked tokens holds about one.
enum Checked {
    Valid(Arc<VerifiedAccess>),
    /// Signed by us but expired; forgotten after `forget_at` (Unix seconds).
    Expired {
        forget_at: i64,
    },
}

/// What the memory of checked tokens says about a token.
pub enum Remembered {
    Valid(Arc<VerifiedAccess>),
    Expired,
    /// Never checked (or forgotten): [`TokenService::check_access`] needs its digest.
    Unknown(KeyHash),
}

/// A token refused by [`TokenService::check_access`].
pub struct Refused {
    pub error: ApiError,
    /// A whole signature check was spent on it: what the bounds on failed checks count (the
    /// other refusals cost little).
    pub checked: bool,
}

impl Refused {
    fn cheap(code: ErrorCode) -> Self {
        Self {
            error: ApiError::new(code),
            checked: false,
        }
    }

    fn after_the_check(code: ErrorCode) -> Self {
        Self {
            error: ApiError::new(code),
            checked: true,
        }
    }
}

/// Longer than any token keyward signs by far; a longer one is refused before it is hashed.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The header that carries the identity token to upstreams.
pub const IDENTITY_HEADER: &str = "x-keyward-identity";

/// The identity headers, in the order [`IdentityHeaders`] holds their values.
static IDENTITY_NAMES: [HeaderName; 6] = [
    HeaderName::from_static("x-keyward-org-id"),
    HeaderName::from_static("x-keyward-project-id"),
    HeaderName::from_static("x-keyward-key-id"),
    HeaderName::from_static("x-keyward-user-id"),
    HeaderName::from_static("x-keyward-scopes"),
    HeaderName::from_static(IDENTITY_HEADER),
];

/// One caller's identity header values (ids, scopes and, when one can be signed, the
/// identity token), kept where the cache's entry is: the names are constants, and the values
/// are cut from one buffer, so sending them writes one reference count, not one per header.
/// Thousands of keys in use make every cache line of this a likely miss per request.
#[derive(Debug)]
pub struct IdentityHeaders {
    values: [Option<HeaderValue>; 6],
}

impl IdentityHeaders {
    /// The plain identity headers of a caller, plus the token when there is one.
    pub fn of(principal: &Principal, token: Option<&str>) -> Self {
        let key_id = principal.key().map(|key| key.id.to_string());
        let scopes = principal.scopes().join(" ");
        let texts = [
            Some(principal.org_id().as_str()),
            principal.project_id(),
            key_id.as_deref(),
            principal.user_id(),
            Some(scopes.as_str()),
            token,
        ];
        let mut buffer = Vec::with_capacity(texts.iter().flatten().map(|t| t.len()).sum());
        for text in texts.iter().flatten() {
            buffer.extend_from_slice(text.as_bytes());
        }
        let buffer = axum::body::Bytes::from(buffer);
        let mut start = 0;
        let values = texts.map(|text| {
            let text = text?;
            let end = start + text.len();
            let value = buffer.slice(start..end);
            start = end;
            // Only a value no header can carry is left out (as a proxy-auth JWT's claims
            // could hold); keys' ids and scopes and the base64url token always fit.
            HeaderValue::from_maybe_shared(value).ok()
        });
        Self { values }
    }

    /// Sets every present header (after the caller dropped client-sent copies).
    pub fn write_to(&self, headers: &mut HeaderMap) {
        for (name, value) in IDENTITY_NAMES.iter().zip(&self.values) {
            if let Some(value) = value {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
}

struct KeyIdentity {
    key: Arc<keyward_core::key::CompactKey>,
    headers: IdentityHeaders,
    renew_at: Renewal,
}

/// A proxy-authenticated user's identity.
struct CachedIdentity {
    org_id: String,
    project_id: Option<String>,
    scopes: Vec<Arc<str>>,
    headers: IdentityHeaders,
    renew_at: Renewal,
}

impl CachedIdentity {
    /// Still this caller's identity (a user's proxy-auth claims may change between requests).
    fn describes(&self, principal: &Principal) -> bool {
        self.scopes.as_slice() == principal.scopes()
            && self.org_id == principal.org_id().as_str()
            && self.project_id.as_deref() == principal.project_id()
    }
}

/// The longest an identity token's renewal is brought forward, at random per signature.
/// Keys first used together (a start, a deploy, a benchmark's warm-up) would otherwise all be
/// re-signed in the same second every half-minute: ~19 µs each, a burst of ~0.2 s of CPU at
/// 10,000 keys, which the requests waiting behind it pay for (a 10–15% throughput dip in that
/// second, measured; docs/profiling.md).
const RENEWAL_SPREAD_MS: u64 = 5_000;

/// When a cached identity is signed anew (milliseconds since the epoch): while the token has
/// 30 s or more to live, less a random part of [`RENEWAL_SPREAD_MS`].
#[derive(Clone, Copy)]
struct Renewal(i64);

impl Renewal {
    fn after_signing(now: Timestamp, random: u64) -> Self {
        let last_fresh_second = now.as_secs() + IDENTITY_TTL_SECS - IDENTITY_TTL_SECS / 2;
        let spread = i64::try_from(random % RENEWAL_SPREAD_MS).unwrap_or(0);
        Self((last_fresh_second + 1) * 1000 - spread)
    }

    fn is_due(self, now: Timestamp) -> bool {
        now.as_millis() >= self.0
    }
}

pub struct TokenService {
    config: TokensConfig,
    proxy: Option<DecodingKey>,
    algorithm: Algorithm,
    keys: RwLock<Keys>,
    /// Identity tokens reused while they have 30 s or more to live: one signature per key
    /// and half-minute instead of one per request.
    identities: dashmap::DashMap<String, CachedIdentity, foldhash::fast::RandomState>,
    key_identities: dashmap::DashMap<usize, KeyIdentity, foldhash::fast::RandomState>,
    /// Access tokens whose signature checked out, by SHA-256 of the token.
    verified: dashmap::DashMap<KeyHash, Checked, crate::cache::PassThrough>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenSetupError {
    #[error("storage: {0}")]
    Store(#[from] keyward_store::StoreError),
    #[error("master key: {0}")]
    MasterKey(#[from] crate::master_key::MasterKeyError),
    #[error("the operating system's random source failed")]
    Random,
}

/// Generates and stores a new Ed25519 signing key, retiring the current one.
pub async fn rotate_signing_key(
    store: &dyn Store,
    master: &MasterKey,
    now: Timestamp,
) -> Result<String, TokenSetupError> {
    let mut seed = secrecy::zeroize::Zeroizing::new([0u8; 32]);
    keyward_core::key_format::fill_random(seed.as_mut()).map_err(|_| TokenSetupError::Random)?;
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    let kid = format!(
        "kw_{}",
        &keyward_core::ids::RequestId::generate().as_str()[4..]
    );
    let record = SigningKeyRecord {
        kid: kid.clone(),
        algorithm: "EdDSA".into(),
        public_key: public.to_vec(),
        private_key: master.encrypt(seed.as_ref())?,
        created_at: now,
        retired_at: None,
    };
    store.add_signing_key(&record).await?;
    Ok(kid)
}

impl TokenService {
    /// HS256 from config, or the Ed25519 keys in the store (one is created when none exists).
    pub async fn load(
        config: &TokensConfig,
        proxy_secret: Option<&str>,
        store: &dyn Store,
        master: Option<&MasterKey>,
        now: Timestamp,
    ) -> Result<Self, TokenSetupError> {
        let service = Self {
            config: config.clone(),
            proxy: proxy_secret.map(|s| DecodingKey::from_secret(s.as_bytes())),
            algorithm: match config.algorithm {
                TokenAlgorithm::EdDSA => Algorithm::EdDSA,
                TokenAlgorithm::HS256 => Algorithm::HS256,
            },
            keys: RwLock::new(Keys {
                signing: None,
                verifiers: HashMap::new(),
            }),
            identities: dashmap::DashMap::default(),
            key_identities: dashmap::DashMap::default(),
            verified: dashmap::DashMap::default(),
        };
        service.reload(store, master, now).await?;
        Ok(service)
    }

    /// Re-reads the signing keys (after `keyward jwt rotate-signing-key` on any node).
    pub async fn reload(
        &self,
        store: &dyn Store,
        master: Option<&MasterKey>,
        now: Timestamp,
    ) -> Result<(), TokenSetupError> {
        let mut keys = Keys {
            signing: None,
            verifiers: HashMap::new(),
        };
        match self.config.algorithm {
            TokenAlgorithm::HS256 => {
                let secret = self.config.hs256_secret.clone().unwrap_or_default();
                keys.signing = Some((
                    "hs256".into(),
                    Signer::Hs256(EncodingKey::from_secret(secret.as_bytes())),
                ));
                keys.verifiers.insert(
                    "hs256".into(),
                    Verifier {
                        key: DecodingKey::from_secret(secret.as_bytes()),
                        public_x: None,
                        valid_until: None,
                    },
                );
            }
            TokenAlgorithm::EdDSA => {
                let Some(master) = master else {
                    return Ok(());
                };
                let mut records = store.signing_keys().await?;
                if !records.iter().any(|r| r.retired_at.is_none()) {
                    rotate_signing_key(store, master, now).await?;
                    records = store.signing_keys().await?;
                }
                let horizon = (MAX_TTL_SECS + LEEWAY_SECS as i64) * 1000;
                for record in records.iter().filter(|r| r.algorithm == "EdDSA") {
                    let valid_until = record.retired_at.map(|at| at.plus_millis(horizon));
                    if valid_until.is_some_and(|until| until <= now) {
                        continue;
                    }
                    keys.verifiers.insert(
                        record.kid.clone(),
                        Verifier {
                            key: DecodingKey::from_ed_der(&record.public_key),
                            public_x: Some(URL_SAFE_NO_PAD.encode(&record.public_key)),
                            valid_until,
                        },
                    );
                    if record.retired_at.is_none() && keys.signing.is_none() {
                        let seed = master.decrypt(&record.private_key)?;
                        let seed: [u8; 32] = seed
                            .as_slice()
                            .try_into()
                            .map_err(|_| crate::master_key::MasterKeyError::Decrypt)?;
                        keys.signing = Some((
                            record.kid.clone(),
                            Signer::Ed25519(Box::new(ed25519_dalek::SigningKey::from_bytes(&seed))),
                        ));
                    }
                }
            }
        }
        if let Ok(mut slot) = self.keys.write() {
            // A new signing key: identity tokens signed by the old one are re-issued.
            let same_signer =
                slot.signing.as_ref().map(|s| &s.0) == keys.signing.as_ref().map(|s| &s.0);
            *slot = keys;
            if !same_signer {
                self.identities.clear();
                self.key_identities.clear();
                self.verified.clear();
            }
        }
        Ok(())
    }

    pub fn ttl_seconds(&self) -> u64 {
        self.config.ttl_seconds
    }

    fn sign<T: Serialize>(&self, typ: &str, claims: &T) -> ApiResult<String> {
        let keys = self
            .keys
            .read()
            .map_err(|_| ApiError::internal("token keys lock poisoned"))?;
        let (kid, key) = keys
            .signing
            .as_ref()
            .ok_or_else(|| ApiError::internal("no signing key loaded"))?;
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.clone());
        header.typ = Some(typ.to_owned());
        key.sign(&header, claims)
    }

    /// A fresh access token for a verified key.
    pub fn issue_access(
        &self,
        key: &keyward_core::key::CompactKey,
        now: Timestamp,
    ) -> ApiResult<String> {
        let iat = now.as_secs();
        let claims = AccessClaims {
            iss: self.config.issuer.clone(),
            sub: key.id.to_string(),
            aud: self.config.audience.clone(),
            org_id: key.profile.org_id.to_string(),
            user_id: key
                .profile
                .created_by
                .starts_with("usr_")
                .then(|| key.profile.created_by.clone()),
            project_id: key.profile.project_id.to_string(),
            key_id: key.id.to_string(),
            scopes: key.scopes().iter().map(|s| s.to_string()).collect(),
            iat,
            nbf: iat,
            exp: iat + i64::try_from(self.config.ttl_seconds).unwrap_or(900),
            jti: keyward_core::ids::RequestId::generate().as_str()[4..].to_owned(),
        };
        self.sign(ACCESS_TYP, &claims)
    }

    /// The identity token for upstreams: the caller's claims, its own `typ` and `aud`, 60 s.
    pub fn issue_identity(&self, principal: &Principal, now: Timestamp) -> ApiResult<String> {
        let iat = now.as_secs();
        let claims = IdentityClaims {
            iss: self.config.issuer.clone(),
            sub: principal.actor_id(),
            aud: format!("{}-upstream", self.config.audience),
            org_id: principal.org_id().to_string(),
            user_id: principal.user_id().map(str::to_owned),
            project_id: principal.project_id().map(str::to_owned),
            key_id: principal.key().map(|k| k.id.to_string()),
            scopes: principal.scopes().iter().map(|s| s.to_string()).collect(),
            iat,
            nbf: iat,
            exp: iat + IDENTITY_TTL_SECS,
            jti: keyward_core::ids::RequestId::generate().as_str()[4..].to_owned(),
        };
        self.sign(IDENTITY_TYP, &claims)
    }

    /// Sets every identity header for this caller (ids, scopes and, unless
    /// `tokens.identity_token = false`, the identity token), reused while the token has 30 s
    /// or more to live (less up to 5 s at random, see [`RENEWAL_SPREAD_MS`]): one signature
    /// per caller and half-minute, and no per-request formatting. The values are copied out
    /// of the cache's entry in place: no handle on the entry to count up and down, only the
    /// values' one shared buffer count.
    pub fn write_identity(
        &self,
        principal: &Principal,
        now: Timestamp,
        headers: &mut HeaderMap,
    ) -> ApiResult<()> {
        // A key's identity is found by the address of its cached `CompactKey` (immutable; a changed
        // key is a new allocation), which the entry keeps alive so the address is not reused.
        if let Some(key) = principal.key() {
            let address = Arc::as_ptr(key) as usize;
            if let Some(entry) = self.key_identities.get(&address)
                && Arc::ptr_eq(&entry.key, key)
                && !entry.renew_at.is_due(now)
            {
                entry.headers.write_to(headers);
                return Ok(());
            }
            let identity = self.identity_headers(principal, now)?;
            identity.write_to(headers);
            self.key_identities.insert(
                address,
                KeyIdentity {
                    key: key.clone(),
                    headers: identity,
                    renew_at: self.renewal(address, now),
                },
            );
            return Ok(());
        }
        let who = principal.actor_str();
        if let Some(entry) = self.identities.get(&*who)
            && !entry.renew_at.is_due(now)
            && entry.describes(principal)
        {
            entry.headers.write_to(headers);
            return Ok(());
        }
        let identity = self.identity_headers(principal, now)?;
        identity.write_to(headers);
        let renew_at = self.renewal(&*who, now);
        self.identities.insert(
            who.into_owned(),
            CachedIdentity {
                org_id: principal.org_id().to_string(),
                project_id: principal.project_id().map(str::to_owned),
                scopes: principal.scopes().to_vec(),
                headers: identity,
                renew_at,
            },
        );
        Ok(())
    }

    /// When an identity signed now is signed anew. Any input that differs between callers
    /// will do for the random part: the spread needs no secrecy.
    fn renewal(&self, caller: impl std::hash::Hash, now: Timestamp) -> Renewal {
        use std::hash::BuildHasher;
        let random = self.identities.hasher().hash_one((caller, now.as_millis()));
        Renewal::after_signing(now, random)
    }

    fn identity_headers(
        &self,
        principal: &Principal,
        now: Timestamp,
    ) -> ApiResult<IdentityHeaders> {
        if !self.config.identity_token {
            return Ok(IdentityHeaders::of(principal, None));
        }
        let token = self.issue_identity(principal, now)?;
        Ok(IdentityHeaders::of(principal, Some(&token)))
    }

    /// Drops identities too old to be reused (called with the periodic flush).
    pub fn evict_identities(&self, now: Timestamp) {
        self.key_identities
            .retain(|_, entry| !entry.renew_at.is_due(now));
        self.identities
            .retain(|_, entry| !entry.renew_at.is_due(now));
        let now_secs = now.as_secs();
        self.verified.retain(|_, checked| {
            if let Checked::Valid(access) = checked {
                let expired_at = access.claims.exp + LEEWAY_SECS as i64;
                if now_secs > expired_at {
                    *checked = Checked::Expired {
                        forget_at: expired_at + EXPIRED_REMEMBERED_SECS,
                    };
                }
            }
            match checked {
                Checked::Valid(_) => true,
                Checked::Expired { forget_at } => now_secs <= *forget_at,
            }
        });
    }

    /// Verifies an access token: signature with one of our keys, the configured algorithm,
    /// `typ`, `iss`, `aud`, `exp`/`nbf` with 30 s leeway. Expired → `expired_token`;
    /// anything else → `invalid_token`.
    ///
    /// A token whose signature checked out is remembered (by its SHA-256) until an hour
    /// after it expires: checking the signature costs ~40 µs, the lookup well under one.
    /// Only tokens we signed get in, so random tokens cannot fill the memory; it is bounded
    /// and emptied when the signing keys change. The key's state is checked on every use by
    /// the caller, as before. The gateway uses [`Self::remembered`] and
    /// [`Self::check_access`], with a bound on failed checks in between.
    pub fn verify_access(&self, token: &str, now: Timestamp) -> ApiResult<Arc<VerifiedAccess>> {
        match self.remembered(token, now) {
            Remembered::Valid(access) => Ok(access),
            Remembered::Expired => Err(ApiError::new(ErrorCode::ExpiredToken)),
            Remembered::Unknown(digest) => self
                .check_access(digest, token, now)
                .map_err(|refused| refused.error),
        }
    }

    /// What the memory of checked tokens holds about `token`.
    pub fn remembered(&self, token: &str, now: Timestamp) -> Remembered {
        let digest = KeyHash::of(token.as_bytes());
        match self.verified.get(&digest).as_deref() {
            None => Remembered::Unknown(digest),
            Some(Checked::Valid(access))
                if now.as_secs() <= access.claims.exp + LEEWAY_SECS as i64 =>
            {
                Remembered::Valid(access.clone())
            }
            Some(_) => Remembered::Expired,
        }
    }

    /// Checks a token [`Self::remembered`] did not know, and remembers it if we signed it.
    pub fn check_access(
        &self,
        digest: KeyHash,
        token: &str,
        now: Timestamp,
    ) -> Result<Arc<VerifiedAccess>, Refused> {
        let checked = match self.verify_access_signature(token, now) {
            Ok(access) => Checked::Valid(Arc::new(access)),
            Err(refused) if refused.error.code == ErrorCode::ExpiredToken => Checked::Expired {
                forget_at: now.as_secs() + EXPIRED_REMEMBERED_SECS,
            },
            Err(refused) => return Err(refused),
        };
        if self.verified.len() >= VERIFIED_CAPACITY {
            self.make_room(now);
        }
        let verdict = match &checked {
            Checked::Valid(access) => Ok(access.clone()),
            Checked::Expired { .. } => Err(Refused::after_the_check(ErrorCode::ExpiredToken)),
        };
        self.verified.insert(digest, checked);
        verdict
    }

    /// A full memory drops the tokens that expired first: the ones in use stay remembered
    /// unless they alone fill it.
    fn make_room(&self, now: Timestamp) {
        let now_secs = now.as_secs();
        self.verified.retain(|_, checked| match checked {
            Checked::Valid(access) => now_secs <= access.claims.exp + LEEWAY_SECS as i64,
            Checked::Expired { .. } => false,
        });
        if self.verified.len() >= VERIFIED_CAPACITY {
            self.verified.clear();
        }
    }

    /// [`Self::verify_access`] without the memory of verified tokens: every check, every time.
    pub fn verify_access_signature(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Result<VerifiedAccess, Refused> {
        let invalid = || Refused::cheap(ErrorCode::InvalidToken);
        if token.len() > MAX_TOKEN_LEN {
            return Err(invalid());
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
        if header.alg != self.algorithm || header.typ.as_deref() != Some(ACCESS_TYP) {
            return Err(invalid());
        }
        let kid = header.kid.ok_or_else(invalid)?;
        let keys = self.keys.read().map_err(|_| Refused {
            error: ApiError::internal("token keys lock poisoned"),
            checked: false,
        })?;
        let verifier = keys.verifiers.get(&kid).ok_or_else(invalid)?;
        if verifier.valid_until.is_some_and(|until| until <= now) {
            return Err(invalid());
        }
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        // From here on the signature is checked (before the claims: an expired token is one
        // we signed), and every refusal has cost a whole check.
        let data = jsonwebtoken::decode::<AccessClaims>(token, &verifier.key, &validation)
            .map_err(|e| {
                Refused::after_the_check(match e.kind() {
                    ErrorKind::ExpiredSignature => ErrorCode::ExpiredToken,
                    _ => ErrorCode::InvalidToken,
                })
            })?;
        let signed_but_invalid = || Refused::after_the_check(ErrorCode::InvalidToken);
        let key_id = KeyId::parse(&data.claims.key_id).ok_or_else(signed_but_invalid)?;
        if data.claims.sub != data.claims.key_id {
            return Err(signed_but_invalid());
        }
        Ok(VerifiedAccess {
            key_id,
            claims: data.claims,
        })
    }

    /// Verifies a proxy-auth JWT: HS256 with `auth.proxy_jwt_secret`, `aud` =
    /// `<audience>-proxy`, `sub` a user id, at most 60 s between `iat` and `exp`, and never a
    /// `typ` of keyward's own tokens.
    pub fn verify_proxy_auth(&self, token: &str, now: Timestamp) -> ApiResult<ProxyClaims> {
        let invalid = || ApiError::new(ErrorCode::InvalidToken);
        let key = self.proxy.as_ref().ok_or_else(invalid)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
        if header.alg != Algorithm::HS256
            || matches!(header.typ.as_deref(), Some(ACCESS_TYP | IDENTITY_TYP))
        {
            return Err(invalid());
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_audience(&[format!("{}-proxy", self.config.audience)]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "aud"]);
        let data =
            jsonwebtoken::decode::<ProxyClaims>(token, key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => ApiError::new(ErrorCode::ExpiredToken),
                    _ => invalid(),
                }
            })?;
        let c = data.claims;
        let leeway = i64::try_from(LEEWAY_SECS).unwrap_or(30);
        if c.exp - c.iat > PROXY_MAX_TTL_SECS
            || c.iat > now.as_secs() + leeway
            || keyward_core::ids::UserId::parse(&c.sub).is_none()
        {
            return Err(invalid());
        }
        Ok(c)
    }

    /// `{"keys": [...]}` with every published Ed25519 key.
    pub fn jwks(&self) -> serde_json::Value {
        let keys = match self.keys.read() {
            Ok(keys) => keys
                .verifiers
                .iter()
                .filter_map(|(kid, v)| {
                    v.public_x.as_ref().map(|x| {
                        json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"})
                    })
                })
                .collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        };
        json!({ "keys": keys })
    }
}

/// A bearer value that is a JWT rather than a key: keys never contain dots.
pub fn looks_like_jwt(token: &[u8]) -> bool {
    token.starts_with(b"eyJ") && token.iter().filter(|&&b| b == b'.').count() == 2
}

/// The key an access token names, read without checking anything: only for deciding whether
/// the token is worth a signature check during a flood of forged ones.
pub fn claimed_key_id(token: &str) -> Option<KeyId> {
    #[derive(Deserialize)]
    struct Claimed<'a> {
        #[serde(borrow)]
        key_id: std::borrow::Cow<'a, str>,
    }
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claimed: Claimed = serde_json::from_slice(&json).ok()?;
    KeyId::parse(&claimed.key_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410), what `EncodingKey::from_ed_der` takes.
    fn pkcs8(seed: &[u8; 32]) -> Vec<u8> {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(seed);
        der
    }

    #[test]
    fn identity_headers_are_the_callers_and_share_one_buffer() {
        let org_id = keyward_core::ids::OrgId::generate();
        let principal = Principal {
            subject: crate::auth::Subject::User {
                user_id: "usr_1".into(),
                project_id: Some("prj_2".into()),
                scopes: vec![Arc::from("read"), Arc::from("write")],
                org_id: org_id.clone(),
                org_tier: Arc::from("free"),
            },
            client_ip: [127, 0, 0, 1].into(),
            at: Timestamp::from_millis(0),
        };
        let identity = IdentityHeaders::of(&principal, Some("a.b.c"));
        let mut headers = HeaderMap::new();
        headers.insert("x-other", HeaderValue::from_static("kept"));
        identity.write_to(&mut headers);
        let got = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
        assert_eq!(got("x-keyward-org-id"), Some(org_id.as_str()));
        assert_eq!(got("x-keyward-project-id"), Some("prj_2"));
        assert_eq!(got("x-keyward-key-id"), None, "a user has no key");
        assert_eq!(got("x-keyward-user-id"), Some("usr_1"));
        assert_eq!(got("x-keyward-scopes"), Some("read write"));
        assert_eq!(got(IDENTITY_HEADER), Some("a.b.c"));
        assert_eq!(got("x-other"), Some("kept"));
        assert_eq!(headers.len(), 6);
        // Cut from one buffer: each value starts where the one before it ended.
        let values: Vec<&HeaderValue> = identity.values.iter().flatten().collect();
        for pair in values.windows(2) {
            let end = pair[0].as_bytes().as_ptr().wrapping_add(pair[0].len());
            assert_eq!(pair[1].as_bytes().as_ptr(), end);
        }
        assert_eq!(identity.values[5].as_ref().map(HeaderValue::len), Some(5));
        // No scopes: an empty header, as before, and the values after it are still sent.
        let mut scopeless = principal.clone();
        if let crate::auth::Subject::User { scopes, .. } = &mut scopeless.subject {
            scopes.clear();
        }
        let mut headers = HeaderMap::new();
        IdentityHeaders::of(&scopeless, Some("a.b.c")).write_to(&mut headers);
        assert_eq!(
            headers.get("x-keyward-scopes").map(HeaderValue::len),
            Some(0)
        );
        assert_eq!(headers.get(IDENTITY_HEADER).map(HeaderValue::len), Some(5));
    }

    #[test]
    fn identity_renewals_leave_30_s_to_live_and_spread_over_5_s() {
        let signed = Timestamp::from_millis(1_800_000_000_123);
        // The token signed then expires 60 s after the second it was signed in.
        let exp_ms = (signed.as_secs() + IDENTITY_TTL_SECS) * 1000;
        let mut renewals = std::collections::BTreeSet::new();
        for random in (0..20_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
            let renewal = Renewal::after_signing(signed, random);
            // Reused only while 30 s or more are left, as without the spread.
            assert!(exp_ms - renewal.0 >= 29_000, "{}", exp_ms - renewal.0);
            assert!(!renewal.is_due(signed.plus_secs(24)));
            assert!(renewal.is_due(signed.plus_secs(31)));
            renewals.insert(renewal.0);
        }
        let (first, last) = (renewals.first().copied(), renewals.last().copied());
        let spread = last.zip(first).map(|(l, f)| l - f);
        // Spread over (nearly) all of the 5 s, not bunched in a few instants.
        assert!(spread.is_some_and(|s| s >= 4_900), "{spread:?}");
        assert!(renewals.len() > 4_000, "{}", renewals.len());
        // With no random part it is the old rule: due once fewer than 30 whole seconds remain.
        let plain = Renewal::after_signing(signed, 0);
        assert!(!plain.is_due(Timestamp::from_millis(exp_ms - 29_001)));
        assert!(plain.is_due(Timestamp::from_millis(exp_ms - 29_000)));
    }

    #[test]
    fn a_prepared_ed25519_key_signs_what_jsonwebtoken_signs() {
        let seed = [7u8; 32];
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("sig_1".into());
        header.typ = Some(IDENTITY_TYP.into());
        let claims = json!({"sub": "key_1", "scopes": ["a", "b"], "exp": 4_000_000_000_i64});
        let prepared = Signer::Ed25519(Box::new(ed25519_dalek::SigningKey::from_bytes(&seed)))
            .sign(&header, &claims)
            .unwrap();
        // Ed25519 signatures are deterministic: the same bytes, or the encoding differs.
        let reference =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&pkcs8(&seed)))
                .unwrap();
        assert_eq!(prepared, reference);
        let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.validate_aud = false;
        let decoded = jsonwebtoken::decode::<serde_json::Value>(
            &prepared,
            &DecodingKey::from_ed_der(public.as_bytes()),
            &validation,
        )
        .unwrap();
        assert_eq!(decoded.claims, claims);
        assert_eq!(decoded.header.kid.as_deref(), Some("sig_1"));
    }
}
