//! A fake Azure IMDS for tests: the real one cannot run here. It follows IMDS's documented
//! managed-identity token protocol — the token endpoint's parameters, its success shape
//! (every value a string) and its error shapes — records every request it receives, and can
//! be told to answer 429/500 or to answer slowly. Its own tests check it against that table.
use std::{
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::http_server::HttpServer;

/// A managed identity assigned to the fake "VM".
#[derive(Clone, Debug)]
pub struct FakeIdentity {
    pub client_id: String,
    pub object_id: String,
    pub resource_id: String,
}

impl FakeIdentity {
    /// An identity whose ids are derived from `name`.
    pub fn named(name: &str) -> FakeIdentity {
        FakeIdentity {
            client_id: format!("client-{name}"),
            object_id: format!("object-{name}"),
            resource_id: format!(
                "/subscriptions/sub/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            ),
        }
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When it arrived.
    pub at: std::time::Instant,
    pub peer: SocketAddr,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    /// A decoded query parameter.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_deref().unwrap_or("").as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// How the fake answers token requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Normal,
    /// Every token request gets this status (429, 500, 404, 410…).
    Fail(u16),
    /// Answer normally after this long.
    Slow(Duration),
}

#[derive(Default)]
struct State {
    identities: Vec<FakeIdentity>,
    seen: Vec<Seen>,
    behaviour: Option<Behaviour>,
    /// Token requests being answered now, and the most ever at once.
    in_flight: usize,
    peak_in_flight: usize,
    /// How long the tokens it issues live, in seconds (`None`: IMDS's usual 86,399).
    lifetime: Option<u64>,
}

/// Counts a token request in flight until dropped.
struct InFlight<'a>(&'a Mutex<State>);

impl<'a> InFlight<'a> {
    fn enter(state: &'a Mutex<State>) -> InFlight<'a> {
        let mut s = state.lock().unwrap();
        s.in_flight += 1;
        s.peak_in_flight = s.peak_in_flight.max(s.in_flight);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().in_flight -= 1;
    }
}

/// The fake, serving on a listener until dropped.
pub struct FakeImds {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _server: HttpServer,
}

/// The token the fake issues for an identity and resource: tests can tell whose it is.
pub fn token_for(client_id: &str, resource: &str) -> String {
    format!("fake-token:{client_id}:{resource}")
}

impl FakeImds {
    /// Serves on `listener` (bound wherever the test needs it, e.g. inside a namespace).
    pub fn serve(listener: TcpListener, identities: Vec<FakeIdentity>) -> FakeImds {
        let state = Arc::new(Mutex::new(State { identities, ..State::default() }));
        let shared = Arc::clone(&state);
        let server = HttpServer::serve(listener, move |peer, req| {
            let state = Arc::clone(&shared);
            async move {
                let _in_flight =
                    (req.uri().path() == "/metadata/identity/oauth2/token").then(|| InFlight::enter(&state));
                answer(&state, peer, req).await
            }
        });
        FakeImds { addr: server.addr, state, _server: server }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Token requests received so far.
    pub fn token_requests(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == "/metadata/identity/oauth2/token").collect()
    }

    /// The most token requests it was answering at once.
    pub fn peak_in_flight(&self) -> usize {
        self.state.lock().unwrap().peak_in_flight
    }

    /// The most token requests it was answering at once since the last call (or the start);
    /// starts counting afresh.
    pub fn take_peak_in_flight(&self) -> usize {
        let mut s = self.state.lock().unwrap();
        let now = s.in_flight;
        std::mem::replace(&mut s.peak_in_flight, now)
    }

    /// The most token requests that arrived within any one second.
    pub fn peak_per_second(&self) -> usize {
        self.peak_per_second_since(None)
    }

    /// The most token requests that arrived within any one second, counting those that
    /// arrived at or after `since`.
    pub fn peak_per_second_since(&self, since: Option<std::time::Instant>) -> usize {
        let times: Vec<std::time::Instant> =
            self.token_requests().iter().map(|s| s.at).filter(|at| since.is_none_or(|since| *at >= since)).collect();
        (0..times.len())
            .map(|i| times[i..].iter().take_while(|t| t.duration_since(times[i]) < Duration::from_secs(1)).count())
            .max()
            .unwrap_or(0)
    }

    /// Issues tokens that live `lifetime` from now on (IMDS's are good for about a day): a
    /// test can have the agent's cache go cold in seconds.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state.lock().unwrap().lifetime = Some(lifetime.as_secs());
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().behaviour = Some(behaviour);
    }
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json; charset=utf-8"));
    r
}

fn error(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": code, "error_description": description }))
}

async fn answer(state: &Mutex<State>, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let seen = Seen {
        at: std::time::Instant::now(),
        peer,
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
    };
    let behaviour = {
        let mut s = state.lock().unwrap();
        s.seen.push(seen.clone());
        s.behaviour.unwrap_or(Behaviour::Normal)
    };
    let metadata = req.headers().get("metadata").is_some_and(|v| v == "true");
    match seen.path.as_str() {
        "/metadata/identity/oauth2/token" => {}
        "/metadata/instance" | "/metadata/instance/compute" if metadata => {
            return json(
                StatusCode::OK,
                &serde_json::json!({ "compute": { "location": "fakeregion", "name": "fake-vm" } }),
            );
        }
        "/metadata/scheduledevents" if metadata => {
            return json(StatusCode::OK, &serde_json::json!({ "DocumentIncarnation": 1, "Events": [] }));
        }
        _ if !metadata => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "Required metadata header not specified")
        }
        _ => return error(StatusCode::NOT_FOUND, "not_found", "Not found"),
    }
    if req.method() != http::Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", "Method not allowed");
    }
    if !metadata {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "Required metadata header not specified");
    }
    if req.headers().contains_key("x-forwarded-for") {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "Request contains X-Forwarded-For header");
    }
    let params: Vec<(String, String)> = form_urlencoded::parse(seen.query.as_deref().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    for (i, (k, _)) in params.iter().enumerate() {
        if params[..i].iter().any(|(p, _)| p == k) {
            return error(StatusCode::BAD_REQUEST, "invalid_request", &format!("Duplicate query parameter '{k}'"));
        }
    }
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if get("api-version").is_none() {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": "Bad request. api-version was not specified in the request", "newest-versions": ["2023-07-01", "2021-12-13", "2018-02-01"] }),
        );
    }
    let Some(resource) = get("resource").filter(|r| !r.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "Required query variable 'resource' is missing");
    };
    let selectors: Vec<(&str, String)> = ["client_id", "object_id", "msi_res_id", "mi_res_id"]
        .into_iter()
        .filter_map(|k| get(k).map(|v| (k, v)))
        .collect();
    if selectors.len() > 1 {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "Multiple identity selectors");
    }
    match behaviour {
        Behaviour::Normal => {}
        Behaviour::Fail(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return error(status, if code == 429 { "too_many_requests" } else { "unknown" }, "Injected failure");
        }
        Behaviour::Slow(delay) => tokio::time::sleep(delay).await,
    }
    let (identities, lifetime) = {
        let s = state.lock().unwrap();
        (s.identities.clone(), s.lifetime.unwrap_or(86_399))
    };
    let identity = match selectors.first() {
        None => identities.first(),
        Some((kind, value)) => identities.iter().find(|i| match *kind {
            "client_id" => i.client_id.eq_ignore_ascii_case(value),
            "object_id" => i.object_id.eq_ignore_ascii_case(value),
            _ => i.resource_id.eq_ignore_ascii_case(value),
        }),
    };
    let Some(identity) = identity else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "Identity not found");
    };
    issue(identity, &resource, lifetime)
}

/// IMDS's success answer: every value a string.
fn issue(identity: &FakeIdentity, resource: &str, lifetime: u64) -> Response<Full<Bytes>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "access_token": token_for(&identity.client_id, resource),
            "client_id": identity.client_id,
            "expires_in": lifetime.to_string(),
            "expires_on": (now + lifetime).to_string(),
            "ext_expires_in": lifetime.to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
    )
}

/// A minimal blocking HTTP/1.1 GET for tests (one request, `Connection: close`): status and
/// body. Good enough to talk to the fake or the agent from the test process itself.
pub fn http_get(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut req = format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.extend([k, ": ", v, "\r\n"]);
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> FakeImds {
        FakeImds::serve(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            vec![FakeIdentity::named("a"), FakeIdentity::named("b")],
        )
    }

    const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
    const MD: &[(&str, &str)] = &[("Metadata", "true")];

    fn body(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn success_has_every_value_as_a_string() {
        let f = fake();
        let (status, text) = http_get(f.addr, &format!("{TOKEN}&client_id=client-b"), MD).unwrap();
        assert_eq!(status, 200);
        let b = body(&text);
        for field in [
            "access_token",
            "client_id",
            "expires_in",
            "expires_on",
            "ext_expires_in",
            "not_before",
            "resource",
            "token_type",
        ] {
            assert!(b[field].is_string(), "{field} in {b}");
        }
        assert_eq!(b["access_token"], token_for("client-b", "https://vault.azure.net"));
        assert_eq!(b["token_type"], "Bearer");
        assert_eq!(f.token_requests().len(), 1);
    }

    /// (path and query, headers, expected status, expected `error_description`).
    type Case<'a> = (String, &'a [(&'a str, &'a str)], u16, &'a str);

    #[test]
    fn errors_follow_the_reference_table() {
        let f = fake();
        let cases: Vec<Case<'_>> = vec![
            (TOKEN.into(), &[], 400, "Required metadata header not specified"),
            (format!("{TOKEN}&client_id=nobody"), MD, 400, "Identity not found"),
            (format!("{TOKEN}&object_id=object-a"), MD, 200, ""),
            (format!("{TOKEN}&mi_res_id=%2Fsubscriptions%2Fsub%2Fresourcegroups%2Frg%2Fproviders%2FMicrosoft.ManagedIdentity%2FuserAssignedIdentities%2Fa"), MD, 200, ""),
            (format!("{TOKEN}&client_id=client-a&object_id=object-a"), MD, 400, "Multiple identity selectors"),
            (format!("{TOKEN}&resource=x"), MD, 400, "Duplicate query parameter 'resource'"),
            ("/metadata/identity/oauth2/token?api-version=2018-02-01".into(), MD, 400, "Required query variable 'resource' is missing"),
            (TOKEN.into(), &[("Metadata", "true"), ("X-Forwarded-For", "10.0.0.1")], 400, "Request contains X-Forwarded-For header"),
        ];
        for (pq, headers, want_status, want_description) in cases {
            let (status, text) = http_get(f.addr, &pq, headers).unwrap();
            assert_eq!(status, want_status, "{pq}: {text}");
            if !want_description.is_empty() {
                assert_eq!(body(&text)["error_description"], want_description, "{pq}");
                assert_eq!(body(&text)["error"], "invalid_request", "{pq}");
            }
        }
        let (status, text) = http_get(f.addr, "/metadata/identity/oauth2/token?resource=r", MD).unwrap();
        assert_eq!(status, 400);
        assert!(body(&text)["newest-versions"].is_array());
    }

    #[test]
    fn injected_failures_and_slowness() {
        let f = fake();
        f.set_behaviour(Behaviour::Fail(429));
        assert_eq!(http_get(f.addr, TOKEN, MD).unwrap().0, 429);
        f.set_behaviour(Behaviour::Fail(500));
        let (status, text) = http_get(f.addr, TOKEN, MD).unwrap();
        assert_eq!((status, body(&text)["error"].as_str()), (500, Some("unknown")));
        f.set_behaviour(Behaviour::Slow(Duration::from_millis(300)));
        let started = std::time::Instant::now();
        assert_eq!(http_get(f.addr, TOKEN, MD).unwrap().0, 200);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(f.token_requests().len(), 3);
    }
}
