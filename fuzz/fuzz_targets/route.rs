//! The request canonicaliser and router: any method, path and headers. Invariants: nothing
//! panics; canonical forms are fixed points; only the exact documented spelling reaches the
//! token endpoint; only exact canonical spellings, never under `/metadata/identity`, are ever
//! routed to the policy as other metadata paths (which decides whether to forward them).
#![no_main]

use imds_agent::imds::{
    path::{canonicalize, classify, under_identity, PathClass, TOKEN_PATH},
    route, Route,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = http::Method::from_bytes(lines.next().unwrap_or("GET").as_bytes()).unwrap_or(http::Method::GET);
    let target = lines.next().unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut headers = http::HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) =
                (http::HeaderName::from_bytes(k.trim().as_bytes()), http::HeaderValue::from_str(v.trim()))
            {
                headers.append(k, v);
            }
        }
    }
    if let Some(canonical) = canonicalize(path) {
        assert_eq!(canonicalize(&canonical).as_ref(), Some(&canonical), "not a fixed point: {path:?}");
    }
    let class = classify(path);
    if class == PathClass::Token {
        assert_eq!(path, TOKEN_PATH);
    }
    match route(&method, path, query, &headers) {
        Ok(Route::Token(_)) => assert_eq!(path, TOKEN_PATH, "token endpoint by another spelling"),
        Ok(Route::Metadata { path: routed, .. }) => {
            assert_eq!(routed, path, "routed a path not spelled canonically");
            assert!(!under_identity(&routed), "routed an identity path: {routed:?}");
        }
        Err(_) => {}
    }
});
