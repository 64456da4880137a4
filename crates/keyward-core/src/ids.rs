//! Prefixed ULID identifiers: `org_…`, `usr_…`, `proj_…`, `key_…`, `req_…`, `aud_…`.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// Audit entries list in the order of their ids, and within one millisecond a ULID's random
/// part would order them at random: this process hands them out in increasing order.
fn next_audit_ulid() -> Ulid {
    static GENERATOR: Mutex<ulid::Generator> = Mutex::new(ulid::Generator::new());
    let mut generator = GENERATOR.lock().unwrap_or_else(PoisonError::into_inner);
    // Overflow needs 2^80 ids in one millisecond.
    generator.generate().unwrap_or_else(|_| Ulid::generate())
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        define_id!($(#[$doc])* $name, $prefix, Ulid::generate());
    };
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $make:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Self {
                // Request ids are made on every request: no formatting machinery.
                let mut encoded = [0; ulid::ULID_LEN];
                let ulid = $make.array_to_str(&mut encoded);
                let mut id = String::with_capacity($prefix.len() + 1 + ulid::ULID_LEN);
                id.push_str($prefix);
                id.push('_');
                id.push_str(ulid);
                Self(id)
            }

            /// Accepts only `<prefix>_<26-character ULID>`.
            pub fn parse(input: &str) -> Option<Self> {
                let rest = input.strip_prefix($prefix)?.strip_prefix('_')?;
                Ulid::from_string(rest).ok()?;
                Some(Self(input.to_owned()))
            }

            /// Wraps a value read back from our own storage.
            pub fn from_trusted(value: String) -> Self {
                Self(value)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

define_id!(
    /// A tenant.
    OrgId, "org");
define_id!(
    /// A person who can log in to the console.
    UserId, "usr");
define_id!(
    /// A project: keys belong to one.
    ProjectId, "proj");
define_id!(
    /// One entry of the audit log; listed in the order of these ids.
    AuditId, "aud", next_audit_ulid());
define_id!(
    /// One HTTP request, echoed in responses and logs.
    RequestId, "req");

/// An API key (stable across rotations), `key_<ULID>`.
///
/// Held as the ULID itself, not as text: 16 bytes inside the cached key and inside every
/// per-key map of the hot path (limiter, usage), where comparing and hashing it costs no
/// pointer chase and no byte loop, and the cache keeps no second allocation per key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(Ulid);

impl KeyId {
    pub const PREFIX: &'static str = "key";
    /// Length of the text form.
    pub const LEN: usize = Self::PREFIX.len() + 1 + ulid::ULID_LEN;

    pub fn generate() -> Self {
        Self(Ulid::generate())
    }

    /// Accepts only `key_<26-character ULID>` in its canonical (upper-case) spelling, the one
    /// keyward writes: any other spelling would name the same key under a second text.
    pub fn parse(input: &str) -> Option<Self> {
        let rest = input.strip_prefix(Self::PREFIX)?.strip_prefix('_')?;
        let ulid = Ulid::from_string(rest).ok()?;
        let mut canonical = [0; ulid::ULID_LEN];
        (ulid.array_to_str(&mut canonical) == rest).then_some(Self(ulid))
    }

    /// Appends the text form to `out` (building names without formatting machinery).
    pub fn push_to(&self, out: &mut String) {
        let mut encoded = [0; ulid::ULID_LEN];
        out.push_str(Self::PREFIX);
        out.push('_');
        out.push_str(self.0.array_to_str(&mut encoded));
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut encoded = [0; ulid::ULID_LEN];
        f.write_str(Self::PREFIX)?;
        f.write_str("_")?;
        f.write_str(self.0.array_to_str(&mut encoded))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Cow::<'de, str>::deserialize(deserializer)?;
        Self::parse(&text).ok_or_else(|| serde::de::Error::custom("not a key id"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_foreign_ones_do_not() {
        let id = KeyId::generate();
        assert_eq!(KeyId::parse(&id.to_string()), Some(id));
        let request = RequestId::generate();
        assert_eq!(RequestId::parse(request.as_str()), Some(request.clone()));
        assert_ne!(RequestId::generate(), request);
        assert!(ProjectId::parse(&id.to_string()).is_none());
        assert!(KeyId::parse("key_").is_none());
        assert!(KeyId::parse("key_not-a-ulid").is_none());
        assert!(KeyId::parse("key01HZZZZZZZZZZZZZZZZZZZZZZZ").is_none());
    }

    #[test]
    fn audit_ids_increase_within_a_millisecond() {
        // Thousands of ids fall in each millisecond here; plain ULIDs would sort at random.
        let ids: Vec<AuditId> = (0..10_000).map(|_| AuditId::generate()).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(ids.iter().all(|id| AuditId::parse(id.as_str()).is_some()));
    }

    #[test]
    fn a_key_id_has_one_text_form() {
        let id = KeyId::generate();
        let text = id.to_string();
        assert_eq!(text.len(), KeyId::LEN);
        let mut pushed = String::from("x:");
        id.push_to(&mut pushed);
        assert_eq!(pushed, format!("x:{text}"));
        assert_eq!(format!("{id:?}"), text);
        // The same ULID spelled in lower case, or with a character past the 128 bits, is not a key id.
        assert!(KeyId::parse(&text.to_lowercase()).is_none());
        assert!(KeyId::parse("key_8ZZZZZZZZZZZZZZZZZZZZZZZZZ").is_none());
        assert!(KeyId::parse(&format!("{text} ")).is_none());
        let json = serde_json::to_string(&id).unwrap_or_default();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<KeyId>(&json).ok(), Some(id));
        assert!(serde_json::from_str::<KeyId>("\"key_nope\"").is_err());
    }
}
