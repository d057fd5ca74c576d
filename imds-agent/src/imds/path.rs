//! Request paths: one canonical form, so no spelling of a path can mean something else to
//! the agent than to the metadata service.
//!
//! NMI's advisory GHSA-p82q-rxpm-hjpc was `/metadata/identity\oauth2\token`: a spelling the
//! filter did not recognise but the service did. Here every path is canonicalised first
//! (percent-decoding until stable, backslashes as slashes, repeated slashes collapsed, dot
//! segments resolved, trailing slashes dropped, lower case) and then:
//! - the token path spelled exactly as IMDS documents it is the token endpoint;
//! - any *other* spelling of the token path is refused (400) and never forwarded;
//! - other paths are allowed or refused by the configured rules, and only their exact
//!   canonical spelling is ever forwarded.

/// The token endpoint, exactly as clients must spell it.
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// What a request path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathClass {
    /// The token endpoint, spelled exactly.
    Token,
    /// Another spelling of the token endpoint: refused, never forwarded.
    TokenVariant,
    /// Any other path, in canonical form; `exact` when the request spelled it canonically.
    Other { canonical: String, exact: bool },
}

/// Classifies a raw request path (without the query).
#[must_use]
pub fn classify(raw: &str) -> PathClass {
    let canonical = canonicalize(raw);
    if canonical == TOKEN_PATH {
        return if raw == TOKEN_PATH { PathClass::Token } else { PathClass::TokenVariant };
    }
    let exact = raw == canonical;
    PathClass::Other { canonical, exact }
}

/// The canonical form of a request path: always starts with `/`, no empty, `.` or `..`
/// segments, no trailing slash (except the root), lower case.
#[must_use]
pub fn canonicalize(raw: &str) -> String {
    // Percent-decode until nothing changes (bounded: each round shortens the string), so
    // `%252f` cannot survive as a slash in disguise.
    let mut decoded = raw.to_owned();
    for _ in 0..8 {
        let next = percent_encoding::percent_decode_str(&decoded).decode_utf8_lossy().into_owned();
        if next == decoded {
            break;
        }
        decoded = next;
    }
    let unified = decoded.replace('\\', "/").to_ascii_lowercase();
    let mut segments: Vec<&str> = Vec::new();
    for segment in unified.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

/// Rules for paths other than the token endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathRules {
    /// Forward GET requests for paths under these canonical prefixes (segment-wise); refuse
    /// the rest with 403.
    Allow(Vec<String>),
    /// Forward every path (NMI's behaviour). Token-path variants are still refused.
    ForwardAll,
}

impl Default for PathRules {
    /// Nothing but the token endpoint: node data (`/metadata/instance`, scheduled events,
    /// attested documents…) is not a pod's business unless the operator says so.
    fn default() -> Self {
        PathRules::Allow(Vec::new())
    }
}

impl PathRules {
    /// Whether a canonical path may be forwarded.
    #[must_use]
    pub fn allows(&self, canonical: &str) -> bool {
        match self {
            PathRules::ForwardAll => true,
            PathRules::Allow(prefixes) => prefixes.iter().any(|p| {
                let p = canonicalize(p);
                canonical == p || canonical.strip_prefix(&p).is_some_and(|rest| rest.starts_with('/')) || p == "/"
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_spelling_is_the_token_endpoint() {
        assert_eq!(classify(TOKEN_PATH), PathClass::Token);
        let variants = [
            r"/metadata/identity\oauth2\token",
            r"\metadata\identity\oauth2\token",
            "/metadata/identity%2foauth2/token",
            "/metadata/identity%2Foauth2%2Ftoken",
            "/metadata/identity%5coauth2/token",
            "/metadata/identity%255coauth2/token",
            "/metadata/identity/./oauth2/token",
            "/metadata/x/../identity/oauth2/token",
            "//metadata//identity/oauth2///token",
            "/metadata/identity/oauth2/token/",
            "/metadata/identity/oauth2/token/.",
            "/Metadata/Identity/OAuth2/Token",
            "/METADATA/IDENTITY/OAUTH2/TOKEN",
            "/%6detadata/identity/oauth2/token",
            "metadata/identity/oauth2/token",
        ];
        for v in variants {
            assert_eq!(classify(v), PathClass::TokenVariant, "{v}");
        }
    }

    #[test]
    fn other_paths_keep_their_canonical_form() {
        assert_eq!(
            classify("/metadata/instance/compute"),
            PathClass::Other { canonical: "/metadata/instance/compute".into(), exact: true }
        );
        assert_eq!(
            classify("/metadata//instance"),
            PathClass::Other { canonical: "/metadata/instance".into(), exact: false }
        );
        assert_eq!(
            classify("/metadata/identity/oauth2/tokenx"),
            PathClass::Other { canonical: "/metadata/identity/oauth2/tokenx".into(), exact: true }
        );
        assert_eq!(classify("/host/token"), PathClass::Other { canonical: "/host/token".into(), exact: true });
        assert_eq!(classify("/../../"), PathClass::Other { canonical: "/".into(), exact: false });
    }

    #[test]
    fn rules_match_whole_segments() {
        let rules = PathRules::Allow(vec!["/metadata/instance".into(), "/Metadata/Versions/".into()]);
        assert!(rules.allows("/metadata/instance"));
        assert!(rules.allows("/metadata/instance/compute/location"));
        assert!(rules.allows("/metadata/versions"));
        assert!(!rules.allows("/metadata/instances"));
        assert!(!rules.allows("/metadata/attested/document"));
        assert!(!PathRules::default().allows("/metadata/instance"));
        assert!(PathRules::ForwardAll.allows("/metadata/scheduledevents"));
    }

    #[test]
    fn canonicalize_is_idempotent_on_samples() {
        for s in ["/a/../b", r"\x\\y", "%2e%2e/%2e/z", "/A//B/./c/..", "", "/"] {
            let once = canonicalize(s);
            assert_eq!(canonicalize(&once), once, "{s}");
        }
    }
}
