//! Request paths: one canonical form, so no spelling of a path can mean something else to
//! the agent than to the metadata service.
//!
//! NMI's advisory GHSA-p82q-rxpm-hjpc was `/metadata/identity\oauth2\token`: a spelling the
//! filter did not recognise but the service did. Here every path is canonicalised first
//! (percent-decoding until stable, backslashes as slashes, repeated slashes collapsed, dot
//! segments resolved, trailing slashes dropped, lower case) and then:
//! - the token path spelled exactly as IMDS documents it is the token endpoint;
//! - any *other* path under `/metadata/identity` is refused (400) and never forwarded, in
//!   every path mode: another spelling of the token path, and anything a server might read as
//!   one (`token;x`, `token.`, `identity;x/…`), or an identity path IMDS may add later;
//! - other paths are allowed or refused by the configured rules, and only their exact
//!   canonical spelling is ever forwarded.

/// The token endpoint, exactly as clients must spell it.
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// What a request path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathClass {
    /// The token endpoint, spelled exactly.
    Token,
    /// Another path under `/metadata/identity` (a spelling of the token endpoint, or any
    /// other identity path): refused, never forwarded.
    TokenVariant,
    /// Any other path, in canonical form; `exact` when the request spelled it canonically.
    Other { canonical: String, exact: bool },
    /// Percent-encoded more deeply than any client would, or with a segment only a lenient
    /// server reads as `.` or `..` (`..;x`, `...`): refused, never forwarded.
    Malformed,
}

/// Classifies a raw request path (without the query).
#[must_use]
pub fn classify(raw: &str) -> PathClass {
    let Some(canonical) = canonicalize(raw) else {
        return PathClass::Malformed;
    };
    if canonical == TOKEN_PATH {
        return if raw == TOKEN_PATH { PathClass::Token } else { PathClass::TokenVariant };
    }
    if under_identity(&canonical) {
        return PathClass::TokenVariant;
    }
    let exact = raw == canonical;
    PathClass::Other { canonical, exact }
}

/// Whether a segment is one a lenient server could read as `.` or `..` once it drops path
/// parameters (`..;x`) or trailing dots and blanks (`...`, `.. `), though it is not one: the
/// canonical form would keep it (or resolve a `..` after it against it), and a prefix rule
/// would match a path that means another one upstream (`/metadata/scheduledevents/..;/identity/…`).
fn disguised_dot_segment(segment: &str) -> bool {
    let bare = segment.split(';').next().unwrap_or_default();
    !matches!(segment, "." | "..")
        && !bare.is_empty()
        && bare.trim_end_matches([' ', '\t', '\0']).chars().all(|c| c == '.')
}

/// Whether a canonical path is under `/metadata/identity`, as a lenient server could read its
/// first two segments: path parameters (`;…`) and trailing dots and blanks dropped.
#[must_use]
pub fn under_identity(canonical: &str) -> bool {
    let bare = |segment: &str| {
        let segment = segment.split(';').next().unwrap_or_default();
        segment.trim_end_matches(['.', ' ', '\t', '\0']).to_owned()
    };
    let mut segments = canonical.trim_start_matches('/').split('/').map(bare);
    segments.next().as_deref() == Some("metadata") && segments.next().as_deref() == Some("identity")
}

/// Most rounds of percent-decoding a path gets. Real clients encode once; the rounds after
/// that exist to see through deliberate disguises like `%252f`.
const DECODE_ROUNDS: usize = 8;

/// The canonical form of a request path: always starts with `/`, no empty, `.` or `..`
/// segments, no trailing slash (except the root), lower case, nothing left to
/// percent-decode. `None` when the path is still percent-encoded after [`DECODE_ROUNDS`]
/// rounds, or has a segment only a lenient server reads as `.` or `..` (`..;x`, `...`): what
/// it means to someone else cannot be known.
#[must_use]
pub fn canonicalize(raw: &str) -> Option<String> {
    // Percent-decode until nothing changes, so `%252f` cannot survive as a slash in disguise.
    let mut decoded = raw.to_owned();
    let mut stable = false;
    for _ in 0..=DECODE_ROUNDS {
        let next = percent_encoding::percent_decode_str(&decoded).decode_utf8_lossy().into_owned();
        if next == decoded {
            stable = true;
            break;
        }
        decoded = next;
    }
    if !stable {
        return None;
    }
    let unified = decoded.replace('\\', "/").to_ascii_lowercase();
    if unified.split('/').any(disguised_dot_segment) {
        return None;
    }
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
    Some(format!("/{}", segments.join("/")))
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
            PathRules::Allow(prefixes) => {
                prefixes.iter().filter_map(|p| canonicalize(p)).any(|p| under_prefix(canonical, &p))
            }
        }
    }
}

/// Whether the canonical path `canonical` is the canonical prefix `prefix` or under it, on
/// whole segments (`/a/b` is under `/a`, `/ab` is not).
#[must_use]
pub fn under_prefix(canonical: &str, prefix: &str) -> bool {
    prefix == "/" || canonical == prefix || canonical.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
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
        // Under /metadata/identity, only the token endpoint exists for pods.
        for identity in [
            "/metadata/identity/oauth2/tokenx",
            "/metadata/identity/oauth2/token;x",
            "/metadata/identity/oauth2/token.",
            "/metadata/identity/oauth2/token%20",
            "/metadata/identity;v=1/oauth2/token",
            "/metadata./identity/oauth2/token",
            "/metadata/identity/info",
            "/metadata/identity",
        ] {
            assert_eq!(classify(identity), PathClass::TokenVariant, "{identity}");
        }
        // Segments a lenient server would read as `..` or `.`: refused, whatever they lead to.
        for climbing in [
            "/metadata/scheduledevents/..;/identity/oauth2/token",
            "/metadata/instance/compute/..;x=1/network",
            "/metadata/instance/.../network",
            "/metadata/instance/..%20/network",
            "/metadata/instance/.;/compute",
        ] {
            assert_eq!(classify(climbing), PathClass::Malformed, "{climbing}");
        }
        assert_eq!(
            classify("/metadata/instance/a..b"),
            PathClass::Other { canonical: "/metadata/instance/a..b".into(), exact: true }
        );
        assert_eq!(
            classify("/metadata/identityx/oauth2/token"),
            PathClass::Other { canonical: "/metadata/identityx/oauth2/token".into(), exact: true }
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
        for s in ["/a/../b", r"\x\\y", "%2e%2e/%2e/z", "/A//B/./c/..", "", "/", "/%2%66", "/%ff%fe"] {
            let once = canonicalize(s).unwrap();
            assert_eq!(canonicalize(&once).as_ref(), Some(&once), "{s}");
        }
    }

    #[test]
    fn encoding_deeper_than_the_decoder_looks_is_malformed() {
        // The token path's last slash, percent-encoded nine times over.
        let mut slash = String::from("%2f");
        for _ in 0..8 {
            slash = slash.replace('%', "%25");
        }
        let path = format!("/metadata/identity/oauth2{slash}token");
        assert_eq!(classify(&path), PathClass::Malformed);
        // Eight levels are still seen through.
        assert_eq!(classify(&path.replacen("%25", "%", 1)), PathClass::TokenVariant);
    }

    mod properties {
        //! Property tests: the canonicaliser never panics, is idempotent, and every spelling
        //! of a path — percent-encoded (to several levels), re-cased, with backslashes,
        //! repeated slashes, dot segments or a trailing slash — classifies as that path does.
        use proptest::prelude::*;

        use super::super::*;

        /// A canonical path: lower-case segments, sometimes the token path.
        fn canonical_path() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(TOKEN_PATH.to_owned()),
                prop::collection::vec("[a-z0-9_-]{1,8}", 0..5).prop_map(|s| format!("/{}", s.join("/"))),
            ]
        }

        /// One way of spelling a single character.
        fn spell_char(c: char, how: u8) -> String {
            let encode = |s: &str| {
                s.bytes().fold(String::new(), |mut out, b| {
                    let _ = std::fmt::Write::write_fmt(&mut out, format_args!("%{b:02X}"));
                    out
                })
            };
            match how % 6 {
                0 | 1 => c.to_string(),
                2 => c.to_ascii_uppercase().to_string(),
                3 => encode(&c.to_string()),
                4 => encode(&encode(&c.to_string())), // %25XX: two levels
                _ => encode(&c.to_string()).to_lowercase(),
            }
        }

        /// Another spelling of `canonical`, chosen by `choices`.
        fn respell(canonical: &str, choices: &[u8]) -> String {
            let mut out = String::new();
            for (i, c) in canonical.chars().enumerate() {
                let how = choices[i % choices.len()];
                if c == '/' {
                    out.push_str(match how % 7 {
                        0 => "\\",
                        1 => "//",
                        2 => "/./",
                        3 => "/zz/../",
                        4 => "%2f",
                        5 => "%5C",
                        _ => "/",
                    });
                } else {
                    out.push_str(&spell_char(c, how));
                }
            }
            if choices.first().is_some_and(|c| c % 5 == 0) {
                out.push('/');
            }
            out
        }

        /// A path under `/metadata/identity` with what lenient servers drop or ignore:
        /// parameters, trailing dots and blanks, more segments.
        fn identity_path() -> impl Strategy<Value = String> {
            let junk = prop_oneof![
                Just(""),
                Just(";"),
                Just(";x=1"),
                Just("."),
                Just(".."),
                Just(" "),
                Just("%20"),
                Just("%00")
            ];
            // Segments before it that a lenient server reads as `..` once it drops what follows
            // a `;`, or trailing dots and blanks.
            let climb = prop_oneof![
                Just(""),
                Just("/metadata/scheduledevents/..;"),
                Just("/metadata/instance/..;x=1"),
                Just("/a/b/..;/.."),
                Just("/a/..."),
                Just("/a/..%20"),
                Just("/a/.;")
            ];
            (climb, junk.clone(), junk.clone(), junk, prop::collection::vec("[a-z0-9_.;-]{0,8}", 0..3)).prop_map(
                |(climb, j1, j2, j3, rest)| {
                    format!("{climb}/metadata{j1}/identity{j2}/oauth2/token{j3}/{}", rest.join("/"))
                },
            )
        }

        proptest! {
            #[test]
            fn nothing_under_identity_is_ever_forwarded(
                path in identity_path(),
                choices in prop::collection::vec(any::<u8>(), 1..32),
            ) {
                // However it is spelt (re-cased, encoded, slashes doubled or turned around),
                // it is the token endpoint exactly, or refused: never `Other`, so no path
                // rule, `ForwardAll` included, can forward it.
                for spelled in [path.clone(), respell(&path, &choices)] {
                    match classify(&spelled) {
                        PathClass::Token => prop_assert_eq!(spelled.as_str(), TOKEN_PATH),
                        PathClass::TokenVariant | PathClass::Malformed => {}
                        other @ PathClass::Other { .. } => prop_assert!(false, "{} → {:?}", spelled, other),
                    }
                }
            }

            #[test]
            fn never_panics_and_is_idempotent(raw in any::<String>()) {
                if let Some(once) = canonicalize(&raw) {
                    prop_assert_eq!(canonicalize(&once), Some(once.clone()));
                    prop_assert!(once.starts_with('/'));
                }
                let _ = classify(&raw);
            }

            #[test]
            fn path_like_input_is_idempotent_too(raw in r"[a-zA-Z0-9%./\\]{0,48}") {
                if let Some(once) = canonicalize(&raw) {
                    prop_assert_eq!(canonicalize(&once), Some(once));
                }
            }

            #[test]
            fn every_spelling_of_a_path_classifies_the_same(
                canonical in canonical_path(),
                choices in prop::collection::vec(any::<u8>(), 1..32),
            ) {
                let spelled = respell(&canonical, &choices);
                let got = canonicalize(&spelled);
                prop_assert_eq!(got.as_deref(), Some(canonical.as_str()), "{}", spelled);
                let class = classify(&spelled);
                if canonical == TOKEN_PATH {
                    let want = if spelled == TOKEN_PATH { PathClass::Token } else { PathClass::TokenVariant };
                    prop_assert_eq!(class, want, "{}", spelled);
                } else if under_identity(&canonical) {
                    prop_assert_eq!(class, PathClass::TokenVariant, "{}", spelled);
                } else {
                    let exact = spelled == canonical;
                    prop_assert_eq!(class, PathClass::Other { canonical, exact }, "{}", spelled);
                }
            }
        }
    }
}
