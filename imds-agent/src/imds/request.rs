//! Validating a request the way IMDS does, before any policy decision.
//!
//! Checks, in order: the path (token-path variants are refused outright), the method (GET
//! only, 405), the `Metadata: true` header, no `X-Forwarded-For`, no duplicate query
//! parameter (names compared case-insensitively), and for the token endpoint a `resource`
//! and at most one identity selector. Errors carry IMDS's JSON shape. Whether another path
//! may be read is the policy's to say (`Snapshot::decide_path`), not the parser's.
use http::{HeaderMap, Method, StatusCode};

use super::path::{classify, PathClass};
use crate::policy::Selector;

/// The content type of IMDS's JSON answers.
pub const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// An IMDS-shaped error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImdsError {
    pub status: StatusCode,
    pub error: &'static str,
    pub description: String,
}

impl ImdsError {
    /// IMDS's 400 `invalid_request` with this description.
    pub fn bad_request(description: impl Into<String>) -> ImdsError {
        ImdsError { status: StatusCode::BAD_REQUEST, error: "invalid_request", description: description.into() }
    }

    /// IMDS's throttling answer (429 `too_many_requests`) with this description.
    pub fn too_many_requests(description: impl Into<String>) -> ImdsError {
        ImdsError { status: StatusCode::TOO_MANY_REQUESTS, error: "too_many_requests", description: description.into() }
    }

    /// A metadata path the caller may not read (403).
    #[must_use]
    pub fn path_forbidden() -> ImdsError {
        ImdsError {
            status: StatusCode::FORBIDDEN,
            error: "forbidden",
            description: "This metadata path is not available to this pod".into(),
        }
    }

    /// IMDS's answer when no assigned identity matches: SDKs stop rather than retry.
    #[must_use]
    pub fn identity_not_found() -> ImdsError {
        ImdsError::bad_request("Identity not found")
    }

    /// The JSON body: `{"error": …, "error_description": …}`.
    #[must_use]
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.error, "error_description": self.description }).to_string()
    }
}

/// A valid token request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub resource: String,
    pub api_version: Option<String>,
    pub selector: Option<Selector>,
}

/// Where a valid request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Token(TokenRequest),
    /// Another path, spelled canonically (as it would be forwarded), with its query.
    Metadata {
        path: String,
        query: Option<String>,
    },
}

/// Validates one request.
pub fn route(method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> Result<Route, ImdsError> {
    let class = classify(path);
    if matches!(class, PathClass::TokenVariant | PathClass::Malformed) {
        return Err(ImdsError::bad_request("Invalid request path"));
    }
    if method != Method::GET {
        return Err(ImdsError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            error: "invalid_request",
            description: format!("The {method} method is not allowed"),
        });
    }
    let metadata_ok = headers.get_all("metadata").iter().count() == 1
        && headers.get("metadata").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    if !metadata_ok {
        return Err(ImdsError::bad_request("Required metadata header not specified"));
    }
    if headers.contains_key("x-forwarded-for") {
        return Err(ImdsError::bad_request("Request contains X-Forwarded-For header"));
    }
    let params = parse_query(query.unwrap_or(""))?;
    match class {
        PathClass::Token => token_request(&params).map(Route::Token),
        PathClass::Other { canonical, exact: true } => {
            Ok(Route::Metadata { path: canonical, query: query.map(str::to_owned) })
        }
        PathClass::Other { exact: false, .. } => Err(ImdsError::bad_request("Invalid request path")),
        PathClass::TokenVariant | PathClass::Malformed => unreachable!("refused above"),
    }
}

/// A token request's query alone (`resource`, at most one selector), validated as for the
/// token endpoint: for endpoints that take the same parameters (`/host/token`).
///
/// # Errors
/// IMDS's answer to such a query.
pub fn token_query(query: Option<&str>) -> Result<TokenRequest, ImdsError> {
    token_request(&parse_query(query.unwrap_or(""))?)
}

/// Decoded query parameters; duplicate names (case-insensitive) are an error.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, ImdsError> {
    let mut params: Vec<(String, String)> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if params.iter().any(|(k, _)| k.eq_ignore_ascii_case(&key)) {
            return Err(ImdsError::bad_request(format!("Query parameter '{key}' is specified more than once")));
        }
        params.push((key.into_owned(), value.into_owned()));
    }
    Ok(params)
}

fn token_request(params: &[(String, String)]) -> Result<TokenRequest, ImdsError> {
    let get = |name: &str| params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    let resource = get("resource")
        .filter(|r| !r.is_empty())
        .ok_or_else(|| ImdsError::bad_request("Required query variable 'resource' is missing"))?;
    let selectors: Vec<Selector> = [
        get("client_id").map(Selector::ClientId),
        get("object_id").map(Selector::ObjectId),
        get("msi_res_id").map(Selector::ResourceId),
        get("mi_res_id").map(Selector::ResourceId),
    ]
    .into_iter()
    .flatten()
    .collect();
    if selectors.len() > 1 {
        return Err(ImdsError::bad_request(
            "Only one of client_id, object_id, msi_res_id or mi_res_id may be specified",
        ));
    }
    let selector = selectors.into_iter().next();
    if selector.as_ref().is_some_and(|s| match s {
        Selector::ClientId(v) | Selector::ObjectId(v) | Selector::ResourceId(v) => v.is_empty(),
    }) {
        return Err(ImdsError::bad_request("An identity selector must not be empty"));
    }
    Ok(TokenRequest { resource, api_version: get("api-version"), selector })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    const TOKEN: &str = "/metadata/identity/oauth2/token";
    const Q: &str = "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";

    fn token(query: &str) -> Result<Route, ImdsError> {
        route(&Method::GET, TOKEN, Some(query), &headers(&[("Metadata", "true")]))
    }

    #[test]
    fn a_valid_token_request() {
        assert_eq!(
            token(&format!("{Q}&client_id=abc")),
            Ok(Route::Token(TokenRequest {
                resource: "https://vault.azure.net".into(),
                api_version: Some("2018-02-01".into()),
                selector: Some(Selector::ClientId("abc".into())),
            }))
        );
        for (q, sel) in [
            (format!("{Q}&object_id=o"), Selector::ObjectId("o".into())),
            (format!("{Q}&msi_res_id=%2Fsubscriptions%2Fx"), Selector::ResourceId("/subscriptions/x".into())),
            (format!("{Q}&mi_res_id=r"), Selector::ResourceId("r".into())),
        ] {
            assert!(matches!(token(&q), Ok(Route::Token(TokenRequest { selector: Some(s), .. })) if s == sel), "{q}");
        }
        assert!(matches!(token(Q), Ok(Route::Token(TokenRequest { selector: None, .. }))));
    }

    type Case<'a> = (Method, &'a str, String, HeaderMap, Result<Route, ImdsError>);

    #[test]
    fn refusals_table() {
        let bad = |d: &str| Err(ImdsError::bad_request(d));
        let h_ok = headers(&[("Metadata", "true")]);
        let cases: Vec<Case<'_>> = vec![
            (Method::GET, TOKEN, Q.into(), headers(&[]), bad("Required metadata header not specified")),
            (
                Method::GET,
                TOKEN,
                Q.into(),
                headers(&[("Metadata", "false")]),
                bad("Required metadata header not specified"),
            ),
            (
                Method::GET,
                TOKEN,
                Q.into(),
                headers(&[("Metadata", "true"), ("Metadata", "true")]),
                bad("Required metadata header not specified"),
            ),
            (
                Method::GET,
                TOKEN,
                Q.into(),
                headers(&[("Metadata", "true"), ("X-Forwarded-For", "1.2.3.4")]),
                bad("Request contains X-Forwarded-For header"),
            ),
            (
                Method::GET,
                TOKEN,
                format!("{Q}&resource=x"),
                h_ok.clone(),
                bad("Query parameter 'resource' is specified more than once"),
            ),
            (
                Method::GET,
                TOKEN,
                format!("{Q}&client_id=a&CLIENT_ID=b"),
                h_ok.clone(),
                bad("Query parameter 'CLIENT_ID' is specified more than once"),
            ),
            (
                Method::GET,
                TOKEN,
                "api-version=2018-02-01".into(),
                h_ok.clone(),
                bad("Required query variable 'resource' is missing"),
            ),
            (
                Method::GET,
                TOKEN,
                format!("{Q}&client_id=a&mi_res_id=b"),
                h_ok.clone(),
                bad("Only one of client_id, object_id, msi_res_id or mi_res_id may be specified"),
            ),
            (
                Method::GET,
                TOKEN,
                format!("{Q}&msi_res_id=a&mi_res_id=a"),
                h_ok.clone(),
                bad("Only one of client_id, object_id, msi_res_id or mi_res_id may be specified"),
            ),
            (
                Method::GET,
                TOKEN,
                format!("{Q}&client_id="),
                h_ok.clone(),
                bad("An identity selector must not be empty"),
            ),
            (Method::GET, r"/metadata/identity\oauth2\token", Q.into(), h_ok.clone(), bad("Invalid request path")),
            (Method::POST, r"/metadata/identity%2Foauth2/token", Q.into(), h_ok.clone(), bad("Invalid request path")),
            (Method::GET, "/metadata//instance", String::new(), h_ok.clone(), bad("Invalid request path")),
        ];
        for (method, path, query, h, want) in cases {
            assert_eq!(route(&method, path, Some(&query), &h), want, "{method} {path}?{query}");
        }
        for method in [Method::POST, Method::PUT, Method::HEAD, Method::OPTIONS, Method::DELETE, Method::PATCH] {
            let got = route(&method, TOKEN, Some(Q), &h_ok).unwrap_err();
            assert_eq!(got.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        }
    }

    #[test]
    fn other_paths_are_routed_only_as_spelled_canonically() {
        let h = headers(&[("Metadata", "true")]);
        assert_eq!(
            route(&Method::GET, "/metadata/instance/compute", Some("api-version=2021-02-01"), &h),
            Ok(Route::Metadata {
                path: "/metadata/instance/compute".into(),
                query: Some("api-version=2021-02-01".into())
            })
        );
        let loose = route(&Method::GET, "/metadata/Instance/compute/", None, &h).unwrap_err();
        assert_eq!(loose, ImdsError::bad_request("Invalid request path"));
        // Never a metadata path, whatever a rule might allow: refused before any rule.
        let identity = route(&Method::GET, "/metadata/identity/info", None, &h).unwrap_err();
        assert_eq!(identity, ImdsError::bad_request("Invalid request path"));
    }

    #[test]
    fn error_bodies_are_imds_json() {
        let body: serde_json::Value = serde_json::from_str(&ImdsError::identity_not_found().body()).unwrap();
        assert_eq!(body, serde_json::json!({"error": "invalid_request", "error_description": "Identity not found"}));
    }
}
