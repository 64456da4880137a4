//! Prefixed ULID identifiers: `org_…`, `usr_…`, `proj_…`, `key_…`, `req_…`, `aud_…`.

use std::fmt;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Self {
                // Request ids are made on every request: no formatting machinery.
                let mut encoded = [0; ulid::ULID_LEN];
                let ulid = Ulid::generate().array_to_str(&mut encoded);
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
    /// An API key (stable across rotations).
    KeyId, "key");
define_id!(
    /// One entry of the audit log.
    AuditId, "aud");
define_id!(
    /// One HTTP request, echoed in responses and logs.
    RequestId, "req");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_foreign_ones_do_not() {
        let id = KeyId::generate();
        assert_eq!(KeyId::parse(id.as_str()), Some(id.clone()));
        let request = RequestId::generate();
        assert_eq!(RequestId::parse(request.as_str()), Some(request.clone()));
        assert_ne!(RequestId::generate(), request);
        assert!(ProjectId::parse(id.as_str()).is_none());
        assert!(KeyId::parse("key_").is_none());
        assert!(KeyId::parse("key_not-a-ulid").is_none());
        assert!(KeyId::parse("key01HZZZZZZZZZZZZZZZZZZZZZZZ").is_none());
    }
}
