//! The query parser, on the token endpoint: any query string. Invariants: nothing panics; a
//! valid request has a resource and at most one selector, and no parameter name twice.
#![no_main]

use imds_agent::imds::{path::TOKEN_PATH, route, token_query, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    let mut headers = http::HeaderMap::new();
    headers.insert("metadata", http::HeaderValue::from_static("true"));
    let routed = route(&http::Method::GET, TOKEN_PATH, Some(&query), &headers);
    // `/host/token` reads the same query the same way.
    assert_eq!(
        routed.as_ref().ok().and_then(|r| match r {
            Route::Token(t) => Some(t.clone()),
            Route::Metadata { .. } => None,
        }),
        token_query(Some(&query)).ok(),
        "the token endpoint and /host/token read {query:?} differently"
    );
    if let Ok(Route::Token(request)) = routed {
        assert!(!request.resource.is_empty());
        let mut names: Vec<String> =
            form_urlencoded_names(&query).into_iter().map(|n| n.to_ascii_lowercase()).collect();
        let before = names.len();
        names.sort();
        names.dedup();
        assert_eq!(before, names.len(), "a parameter twice was accepted: {query:?}");
        let selectors = names
            .iter()
            .filter(|n| ["client_id", "object_id", "msi_res_id", "mi_res_id"].contains(&n.as_str()))
            .count();
        assert!(selectors <= 1, "two selectors were accepted: {query:?}");
    }
});

/// Parameter names as `application/x-www-form-urlencoded` decodes them.
fn form_urlencoded_names(query: &str) -> Vec<String> {
    form_urlencoded::parse(query.as_bytes()).map(|(name, _)| name.into_owned()).collect()
}
