//! The API key format (DESIGN.md section 1).
//!
//! A key is `<prefix><random><checksum>`:
//! - `prefix` is rendered from a per-project template (`kw_{env}_`, `xero_{project}_`, `sk-`);
//! - `random` is `random_length` base62 characters drawn uniformly from the OS CSPRNG
//!   (43 characters carry 256 bits);
//! - `checksum`, when enabled, is CRC32 of everything before it in 6 base62 digits, so a typo
//!   or a random string is rejected before any lookup, and secret scanners can recognise keys.
//!
//! Only the SHA-256 of the whole key is ever stored.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const CHECKSUM_LEN: usize = 6;
/// Longest credential we even look at; anything longer is malformed.
pub const MAX_KEY_LEN: usize = 256;
pub const MIN_RANDOM_LENGTH: usize = 16;
pub const MAX_RANDOM_LENGTH: usize = 128;
/// Rendered prefixes are kept short so keys stay under [`MAX_KEY_LEN`].
pub const MAX_PREFIX_LEN: usize = 64;

/// `live` or `test`, rendered into `{env}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    #[default]
    Live,
    Test,
}

impl Environment {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
        }
    }

    pub fn parse(input: &str) -> Option<Self> {
        match input {
            "live" => Some(Self::Live),
            "test" => Some(Self::Test),
            _ => None,
        }
    }
}

/// Deployment-wide shape of the random part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyFormat {
    pub random_length: usize,
    pub checksum: bool,
}

impl Default for KeyFormat {
    fn default() -> Self {
        Self {
            random_length: 43,
            checksum: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("the operating system's random source failed")]
    Random,
    #[error("{0}")]
    Invalid(String),
}

/// A validated prefix template, e.g. `kw_{env}_` or `xero_{project}_`.
#[derive(Clone, PartialEq, Eq)]
pub struct PrefixTemplate(String);

impl PrefixTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        if template.is_empty() {
            return Err("the prefix template must not be empty".into());
        }
        let mut rest = template;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let end = after
                    .find('}')
                    .ok_or_else(|| format!("unclosed placeholder in `{template}`"))?;
                match &after[..end] {
                    "env" | "project" => {}
                    other => {
                        return Err(format!(
                            "unknown placeholder `{{{other}}}` in `{template}` (use {{env}} or {{project}})"
                        ));
                    }
                }
                rest = &after[end + 1..];
            } else {
                let c = rest.chars().next().unwrap_or('_');
                if !(c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    return Err(format!(
                        "`{c}` is not allowed in a key prefix (letters, digits, `_` and `-` only)"
                    ));
                }
                rest = &rest[c.len_utf8()..];
            }
        }
        let longest =
            Self(template.to_owned()).render(Environment::Live, &"x".repeat(MAX_SLUG_LEN));
        if longest.len() > MAX_PREFIX_LEN {
            return Err(format!(
                "the prefix template renders to more than {MAX_PREFIX_LEN} characters"
            ));
        }
        Ok(Self(template.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn render(&self, env: Environment, project_slug: &str) -> String {
        self.0
            .replace("{env}", env.as_str())
            .replace("{project}", project_slug)
    }
}

impl Default for PrefixTemplate {
    /// `kw_{env}_`, the format of DESIGN.md.
    fn default() -> Self {
        Self("kw_{env}_".to_owned())
    }
}

impl fmt::Debug for PrefixTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrefixTemplate({:?})", self.0)
    }
}

pub const MAX_SLUG_LEN: usize = 40;

/// Project slugs: lowercase letters, digits and `-`, starting with a letter or digit.
pub fn validate_slug(slug: &str) -> Result<(), String> {
    let valid_chars = slug
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let starts_well = slug
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if slug.is_empty() || slug.len() > MAX_SLUG_LEN || !valid_chars || !starts_well {
        return Err(format!(
            "a slug is 1 to {MAX_SLUG_LEN} lowercase letters, digits or `-`, starting with a letter or digit"
        ));
    }
    Ok(())
}

/// Fills `buf` from the OS CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), FormatError> {
    getrandom::fill(buf).map_err(|_| FormatError::Random)
}

/// Generates a new secret: `prefix` + random + checksum.
pub fn generate(prefix: &str, format: KeyFormat) -> Result<SecretString, FormatError> {
    if !(MIN_RANDOM_LENGTH..=MAX_RANDOM_LENGTH).contains(&format.random_length) {
        return Err(FormatError::Invalid(format!(
            "random_length must be between {MIN_RANDOM_LENGTH} and {MAX_RANDOM_LENGTH}"
        )));
    }
    let mut key = String::with_capacity(prefix.len() + format.random_length + CHECKSUM_LEN);
    key.push_str(prefix);
    let mut pool = [0u8; 64];
    let mut produced = 0;
    while produced < format.random_length {
        fill_random(&mut pool)?;
        for &byte in &pool {
            // 248 = 4 × 62: rejecting the top 8 values keeps every character equally likely.
            if byte < 248 && produced < format.random_length {
                key.push(char::from(BASE62[usize::from(byte % 62)]));
                produced += 1;
            }
        }
    }
    pool.fill(0);
    if format.checksum {
        let digits = checksum_digits(key.as_bytes());
        key.extend(digits.iter().map(|&b| char::from(b)));
    }
    Ok(SecretString::from(key))
}

/// CRC32 of `data` as 6 base62 digits, most significant first.
pub fn checksum_digits(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut value = u64::from(crc32fast::hash(data));
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    out
}

fn base62_value(byte: u8) -> Option<u64> {
    match byte {
        b'0'..=b'9' => Some(u64::from(byte - b'0')),
        b'A'..=b'Z' => Some(u64::from(byte - b'A') + 10),
        b'a'..=b'z' => Some(u64::from(byte - b'a') + 36),
        _ => None,
    }
}

/// True when the last 6 characters are the checksum of everything before them.
pub fn verify_checksum(token: &[u8]) -> bool {
    let Some(split) = token.len().checked_sub(CHECKSUM_LEN) else {
        return false;
    };
    let (body, digits) = token.split_at(split);
    let mut value: u64 = 0;
    for &d in digits {
        let Some(v) = base62_value(d) else {
            return false;
        };
        value = value * 62 + v;
    }
    value == u64::from(crc32fast::hash(body))
}

/// Cheap structural check done before any lookup: length, alphabet, checksum.
/// Needs no knowledge of project prefixes, so keys survive template changes.
pub fn is_well_formed(token: &[u8], format: KeyFormat) -> bool {
    let min_len = 1 + MIN_RANDOM_LENGTH + if format.checksum { CHECKSUM_LEN } else { 0 };
    if token.len() < min_len || token.len() > MAX_KEY_LEN {
        return false;
    }
    if !token
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return false;
    }
    !format.checksum || verify_checksum(token)
}

/// SHA-256 of a full key: what storage and the cache know a key by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(token: &[u8]) -> Self {
        Self(Sha256::digest(token).into())
    }

    pub fn of_secret(secret: &SecretString) -> Self {
        Self::of(secret.expose_secret().as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// Constant-time equality, for the rare place that compares hashes directly.
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KeyHash({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// What the API shows instead of the secret: the prefix and the last 4 characters.
pub fn hint(prefix: &str, secret: &SecretString) -> String {
    let token = secret.expose_secret();
    let tail_start = token.len().saturating_sub(4);
    format!("{prefix}…{}", &token[tail_start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn expose(s: &SecretString) -> String {
        s.expose_secret().to_owned()
    }

    #[test]
    fn default_key_shape() -> Result<(), FormatError> {
        let key = generate("kw_live_", KeyFormat::default())?;
        let k = expose(&key);
        assert_eq!(k.len(), 8 + 43 + 6);
        assert!(k.starts_with("kw_live_"));
        assert!(is_well_formed(k.as_bytes(), KeyFormat::default()));
        Ok(())
    }

    #[test]
    fn seed_formats_are_expressible() -> Result<(), Box<dyn std::error::Error>> {
        // Xora: `nte_` and 52 characters in all.
        let nte = KeyFormat {
            random_length: 42,
            checksum: true,
        };
        assert_eq!(expose(&generate("nte_", nte)?).len(), 52);
        // ExoGraph: `exo_key_live_<32>`, no checksum.
        let exo = KeyFormat {
            random_length: 32,
            checksum: false,
        };
        let t = PrefixTemplate::parse("exo_key_{env}_")?;
        let k = expose(&generate(&t.render(Environment::Live, "x"), exo)?);
        assert!(k.starts_with("exo_key_live_") && k.len() == 13 + 32);
        // Xerotier: `xero_<slug>_<random>`.
        let t = PrefixTemplate::parse("xero_{project}_")?;
        assert_eq!(
            t.render(Environment::Test, "my-project"),
            "xero_my-project_"
        );
        Ok(())
    }

    #[test]
    fn templates_are_validated() {
        assert!(PrefixTemplate::parse("kw_{env}_").is_ok());
        assert!(PrefixTemplate::parse("sk-").is_ok());
        assert!(PrefixTemplate::parse("").is_err());
        assert!(PrefixTemplate::parse("kw_{org}_").is_err());
        assert!(PrefixTemplate::parse("kw_{env").is_err());
        assert!(PrefixTemplate::parse("kw/").is_err());
        assert!(PrefixTemplate::parse("kw é").is_err());
        assert!(PrefixTemplate::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn slugs_are_validated() {
        assert!(validate_slug("my-project").is_ok());
        assert!(validate_slug("default").is_ok());
        assert!(validate_slug("-x").is_err());
        assert!(validate_slug("My").is_err());
        assert!(validate_slug("a_b").is_err());
        assert!(validate_slug("").is_err());
    }

    #[test]
    fn random_strings_and_garbage_are_rejected() {
        let f = KeyFormat::default();
        assert!(!is_well_formed(b"", f));
        assert!(!is_well_formed(b"kw_live_short", f));
        assert!(!is_well_formed(&[b'a'; 300], f));
        assert!(!is_well_formed(
            "kw_live_ääääääääääääääääääääääääääää".as_bytes(),
            f
        ));
        assert!(!is_well_formed(
            b"kw_live_0123456789012345678901234567890123456789012XXXXXX",
            f
        ));
    }

    #[test]
    fn hint_shows_prefix_and_last_four() -> Result<(), FormatError> {
        let key = generate("kw_test_", KeyFormat::default())?;
        let k = expose(&key);
        assert_eq!(
            hint("kw_test_", &key),
            format!("kw_test_…{}", &k[k.len() - 4..])
        );
        Ok(())
    }

    #[test]
    fn a_million_keys_do_not_collide() -> Result<(), FormatError> {
        let mut seen = HashSet::with_capacity(1_000_000);
        for _ in 0..1_000_000 {
            let key = generate("kw_live_", KeyFormat::default())?;
            assert!(seen.insert(KeyHash::of_secret(&key)));
        }
        Ok(())
    }

    #[test]
    fn every_single_character_substitution_is_caught() -> Result<(), FormatError> {
        let key = generate("kw_live_", KeyFormat::default())?;
        let original = expose(&key).into_bytes();
        for i in 0..original.len() {
            for &c in BASE62.iter().chain(b"_-") {
                if c == original[i] {
                    continue;
                }
                let mut changed = original.clone();
                changed[i] = c;
                assert!(
                    !verify_checksum(&changed),
                    "position {i} → {}",
                    char::from(c)
                );
            }
        }
        Ok(())
    }

    fn template_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                "[A-Za-z0-9_-]{1,6}",
                Just("{env}".to_owned()),
                Just("{project}".to_owned()),
            ],
            1..5,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn generate_then_parse_round_trips(
            template in template_strategy(),
            slug in "[a-z0-9][a-z0-9-]{0,20}",
            test_env in any::<bool>(),
            random_length in MIN_RANDOM_LENGTH..=64usize,
            checksum in any::<bool>(),
        ) {
            // Templates that validation refuses (too long) are covered by `templates_are_validated`.
            let parsed = PrefixTemplate::parse(&template);
            prop_assume!(parsed.is_ok());
            let template = parsed.map_err(TestCaseError::fail)?;
            let env = if test_env { Environment::Test } else { Environment::Live };
            let prefix = template.render(env, &slug);
            let format = KeyFormat { random_length, checksum };
            let key = generate(&prefix, format).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let k = expose(&key);
            prop_assert!(k.starts_with(&prefix));
            prop_assert_eq!(k.len(), prefix.len() + random_length + if checksum { CHECKSUM_LEN } else { 0 });
            prop_assert!(is_well_formed(k.as_bytes(), format));
            prop_assert_eq!(KeyHash::of(k.as_bytes()), KeyHash::of_secret(&key));
        }

        #[test]
        fn any_single_character_change_fails_the_checksum(
            position in any::<prop::sample::Index>(),
            replacement in any::<u8>(),
        ) {
            let key = generate("kw_live_", KeyFormat::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut bytes = expose(&key).into_bytes();
            let i = position.index(bytes.len());
            prop_assume!(bytes[i] != replacement);
            bytes[i] = replacement;
            prop_assert!(!verify_checksum(&bytes));
            prop_assert!(!is_well_formed(&bytes, KeyFormat::default()));
        }
    }
}
