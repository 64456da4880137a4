//! Request-path normalisation and route matching (DESIGN.md section 2).
//!
//! No spelling of a path may reach a route its scopes do not allow, so before matching:
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other escapes
//!   are kept with upper-case hex (an encoded `/` never splits a segment);
//! - dot-segments are removed (RFC 3986 §5.2.4) and duplicate slashes collapsed;
//! - paths that a lenient upstream could still read differently are refused: encoded NUL,
//!   backslashes, and segments that hide a dot-segment behind an encoded slash.
//!
//! Matching compares segments case-insensitively and ignores trailing dots, so `/ADMIN./x`
//! is held to the same route (and scopes) as `/admin/x`.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadEscape,
    Forbidden,
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Fully percent-decodes one segment (for the safety checks only).
fn fully_decoded(segment: &str) -> Vec<u8> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex_value(bytes[i + 1]), hex_value(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// True when `path` is its own normal form: absolute, printable ASCII without `%` or `\\`,
/// no empty segment but a trailing one, no dot-segment. Nearly every request's path is.
fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let printable = |b: u8| (0x21..0x7f).contains(&b) && b != b'%' && b != b'\\';
    if !rest.bytes().all(printable) {
        return false;
    }
    // Split as bytes: a short path costs less than setting up a `char` searcher.
    let mut segments = segments_of(rest).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            b"." | b".." => return false,
            // Only the last segment may be empty: a trailing slash.
            b"" if !last => return false,
            _ => {}
        }
    }
    true
}

fn segments_of(path: &str) -> std::slice::Split<'_, u8, impl FnMut(&u8) -> bool> {
    path.as_bytes().split(|&b| b == b'/')
}

/// Normalises the path part of a request target (no query); borrows a path that is normal
/// already.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    normalize_slowly(path).map(Cow::Owned)
}

fn normalize_slowly(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Decode unreserved escapes, canonicalise the others.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) else {
                return Err(PathError::BadEscape);
            };
            let value = h * 16 + l;
            if value == 0 || value == b'\\' {
                return Err(PathError::Forbidden);
            }
            if is_unreserved(value) {
                decoded.push(char::from(value));
            } else {
                decoded.push('%');
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
            }
            i += 3;
        } else {
            if b == b'\\' || b < 0x20 || b == 0x7f {
                return Err(PathError::Forbidden);
            }
            decoded.push(char::from(b));
            i += 1;
        }
    }
    // 2. Remove dot-segments and empty segments.
    let trailing_slash =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => {
                // An encoded slash hiding a dot-segment (`a%2F..%2Fadmin`) is refused: an
                // upstream that decodes before normalising would climb out of the route.
                let full = fully_decoded(s);
                if full.contains(&b'/')
                    && full
                        .split(|&c| c == b'/')
                        .any(|part| part == b"." || part == b"..")
                {
                    return Err(PathError::Forbidden);
                }
                out.push(s);
            }
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for segment in &out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() || (trailing_slash && !out.is_empty()) {
        normalized.push('/');
    }
    Ok(normalized)
}

/// The form a segment is compared in: ASCII lower case, trailing dots removed.
fn match_form(segment: &[u8]) -> &[u8] {
    let kept = segment
        .iter()
        .rposition(|&b| b != b'.')
        .map_or(0, |i| i + 1);
    &segment[..kept]
}

/// True when `route_prefix` (e.g. `/v1/chat/`) covers the normalised `path` segment-wise.
pub fn prefix_matches(route_prefix: &str, path: &str) -> bool {
    let mut path_segments = segments_of(path).filter(|s| !s.is_empty());
    segments_of(route_prefix)
        .filter(|s| !s.is_empty())
        .all(|want| {
            path_segments
                .next()
                .is_some_and(|have| match_form(have).eq_ignore_ascii_case(match_form(want)))
        })
}

/// Number of segments in a route prefix: the longest match wins.
pub fn specificity(route_prefix: &str) -> usize {
    route_prefix.split('/').filter(|s| !s.is_empty()).count()
}

/// The path with its first `skip` segments removed (a route prefix's [`specificity`]), for
/// `strip_prefix`: a suffix of the (normalised) `path`, or `/` when nothing is left.
pub fn strip(skip: usize, path: &str) -> &str {
    // A normalised path has no empty segment but a trailing one: the rest starts at the
    // slash before segment `skip + 1`.
    let mut slashes = path.bytes().enumerate().filter(|&(_, b)| b == b'/');
    match slashes.nth(skip) {
        Some((at, _)) if at + 1 < path.len() => &path[at..],
        _ => "/",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn normalisation() {
        assert_eq!(n("/").as_deref(), Ok("/"));
        assert_eq!(n("/a/b").as_deref(), Ok("/a/b"));
        assert_eq!(n("/a/b/").as_deref(), Ok("/a/b/"));
        assert_eq!(n("//admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/public/../admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/public/%2e%2e/admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/public/%2E%2E/admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/public/.%2e/admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/../../admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/a/./b/.").as_deref(), Ok("/a/b/"));
        assert_eq!(n("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(n("/%61dmin").as_deref(), Ok("/admin"));
        assert_eq!(n("/a%2fb").as_deref(), Ok("/a%2Fb"));
        assert_eq!(n("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(n("relative"), Err(PathError::NotAbsolute));
        assert_eq!(n("/a%2"), Err(PathError::BadEscape));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%00b"), Err(PathError::Forbidden));
        assert_eq!(n("/a%5c..%5cadmin"), Err(PathError::Forbidden));
        assert_eq!(n("/public/a%2F..%2F..%2Fadmin"), Err(PathError::Forbidden));
        assert_eq!(n("/public/%2e%2e%2fadmin"), Err(PathError::Forbidden));
    }

    #[test]
    fn matching_is_segment_wise_case_insensitive_and_ignores_trailing_dots() {
        assert!(prefix_matches("/v1/chat/", "/v1/chat/completions"));
        assert!(prefix_matches("/v1/chat/", "/v1/chat"));
        assert!(prefix_matches("/v1/chat/", "/V1/CHAT/x"));
        assert!(prefix_matches("/admin/", "/admin./x"));
        assert!(prefix_matches("/admin/", "/admin.../x"));
        assert!(!prefix_matches("/v1/chat/", "/v1/chatty"));
        assert!(!prefix_matches("/v1/chat/", "/v1/cha"));
        assert!(!prefix_matches("/admin/", "/admin%2Fx"));
        assert!(prefix_matches("/", "/anything"));
        assert_eq!(specificity("/v1/chat/"), 2);
        assert_eq!(specificity("/"), 0);
    }

    #[test]
    fn stripping() {
        assert_eq!(strip(specificity("/echo/"), "/echo/a/b"), "/a/b");
        assert_eq!(strip(specificity("/echo/"), "/echo"), "/");
        assert_eq!(strip(specificity("/echo/"), "/echo/"), "/");
        assert_eq!(strip(specificity("/echo/"), "/echo/a/"), "/a/");
        assert_eq!(strip(specificity("/"), "/a/b"), "/a/b");
        assert_eq!(strip(specificity("/"), "/"), "/");
        assert_eq!(
            strip(specificity("/v1/chat/"), "/v1/chat/completions/x"),
            "/completions/x"
        );
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in ["/", "/a", "/a/b/", "/v1/chat/completions", "/a.b/.c/~d_-"] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
        for path in [
            "//a", "/a//b", "/a/./b", "/a/..", "/a/.", "/%61", "/a b", "/a\\b", "/é",
        ] {
            assert!(!is_normal(path), "{path}");
        }
    }

    proptest::proptest! {
        /// The shortcut agrees with the full normalisation on every path it takes.
        #[test]
        fn the_shortcut_changes_nothing(path in proptest::prop_oneof![
            "/[a./]{0,12}",
            "/[a./%2eE\\\\ \\x00~é-]{0,12}",
        ]) {
            let full = normalize_slowly(&path);
            if is_normal(&path) {
                proptest::prop_assert_eq!(full.as_deref(), Ok(path.as_str()));
            }
            proptest::prop_assert_eq!(normalize(&path).map(Cow::into_owned), full);
        }

        /// Stripping keeps the segments after the prefix, and a trailing slash with them.
        #[test]
        fn stripping_drops_whole_segments(path in "/[ab/]{0,10}", skip in 0usize..3) {
            let path = normalize(&path).unwrap().into_owned();
            let prefix = "/p".repeat(skip) + "/";
            let rest: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).skip(skip).collect();
            let mut want = format!("/{}", rest.join("/"));
            if path.ends_with('/') && !rest.is_empty() {
                want.push('/');
            }
            proptest::prop_assert_eq!(strip(specificity(&prefix), &path), want.as_str());
        }
    }
}
