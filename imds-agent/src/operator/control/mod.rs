//! The agent's control socket: `imds-agent status`, `explain` and `health` ask the running
//! agent here.
//!
//! A Unix socket, not a TCP port: `/explain` tells which identities a pod is bound to, and
//! any pod on the node can reach the node's addresses (the metrics port among them). The
//! socket is owner-only (0600, in a 0700 directory), so only root on the node, or in the
//! agent's own container, can ask. HTTP/1.1 on it; the questions are [`Query`], defined once
//! here for both ends: [`server`] answers them, [`client`] asks them.
use crate::operator::explain::PodRef;

pub mod client;
pub mod server;

/// Where the agent listens and the commands ask, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/imds-filter/agent.sock";

/// One question on the control socket, and its request line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// `GET /status`: the agent's account of itself, as JSON
    /// ([`crate::operator::status::AgentStatus`]).
    Status,
    /// `GET /explain?pod=NS/NAME&request=PATH` (or `uid=UID`): the policy simulator over the
    /// policy in force, as JSON ([`crate::operator::explain::Explanation`]).
    Explain { pod: PodRef, request: String },
    /// `GET /healthz`: as on the metrics port, as text.
    Health,
    /// `GET /readyz`: as on the metrics port, as text.
    Ready,
}

/// Why a request on the control socket is not a [`Query`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("not found: try /status, /explain, /healthz or /readyz")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
}

impl Query {
    /// The request's path and query.
    #[must_use]
    pub fn uri(&self) -> String {
        match self {
            Query::Status => "/status".to_owned(),
            Query::Health => "/healthz".to_owned(),
            Query::Ready => "/readyz".to_owned(),
            Query::Explain { pod, request } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                match pod {
                    PodRef::Named { namespace, name } => query.append_pair("pod", &format!("{namespace}/{name}")),
                    PodRef::Uid(uid) => query.append_pair("uid", uid),
                };
                format!("/explain?{}", query.append_pair("request", request).finish())
            }
        }
    }

    /// The query a request's path and query string ask.
    ///
    /// # Errors
    /// An unknown path, or `/explain` without exactly one of `pod` and `uid`.
    pub fn parse(path: &str, query: Option<&str>) -> Result<Query, QueryError> {
        match path {
            "/status" => Ok(Query::Status),
            "/healthz" => Ok(Query::Health),
            "/readyz" => Ok(Query::Ready),
            "/explain" => {
                let params: std::collections::HashMap<String, String> =
                    form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect();
                let pod = match (params.get("pod"), params.get("uid")) {
                    (Some(pod), None) => PodRef::parse(pod).map_err(QueryError::Invalid)?,
                    (None, Some(uid)) => PodRef::Uid(uid.clone()),
                    _ => return Err(QueryError::Invalid("give pod=NAMESPACE/NAME or uid=UID".into())),
                };
                let request =
                    params.get("request").map_or(crate::operator::explain::DEFAULT_REQUEST, String::as_str).to_owned();
                Ok(Query::Explain { pod, request })
            }
            _ => Err(QueryError::NotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(query: &Query) -> Result<Query, QueryError> {
        let uri: http::Uri = query.uri().parse().expect("a valid request target");
        Query::parse(uri.path(), uri.query())
    }

    #[test]
    fn every_query_reads_back_as_itself() {
        let named = PodRef::Named { namespace: "team-a".into(), name: "web-0".into() };
        for query in [
            Query::Status,
            Query::Health,
            Query::Ready,
            Query::Explain { pod: named.clone(), request: "/metadata/instance?api-version=2021-02-01".into() },
            // A request carrying its own query, ampersands, percent-escapes and spaces.
            Query::Explain {
                pod: PodRef::Uid("0b6d7c4e-1111-2222-3333-444455556666".into()),
                request: "/metadata/identity/oauth2/token?resource=https%3A%2F%2Fvault&client_id=a b&x=1".into(),
            },
            Query::Explain { pod: named, request: String::new() },
        ] {
            assert_eq!(round_trip(&query), Ok(query.clone()), "{}", query.uri());
        }
    }

    #[test]
    fn explain_without_a_request_asks_the_default_one() {
        let parsed = Query::parse("/explain", Some("pod=ns/p"));
        let pod = PodRef::Named { namespace: "ns".into(), name: "p".into() };
        assert_eq!(parsed, Ok(Query::Explain { pod, request: crate::operator::explain::DEFAULT_REQUEST.into() }));
    }

    #[test]
    fn what_is_not_a_query_is_refused_with_why() {
        assert_eq!(Query::parse("/", None), Err(QueryError::NotFound));
        assert_eq!(Query::parse("/metrics", None), Err(QueryError::NotFound));
        for query in [None, Some("pod=ns/p&uid=u"), Some("request=/x"), Some("pod=noslash")] {
            assert!(matches!(Query::parse("/explain", query), Err(QueryError::Invalid(_))), "{query:?}");
        }
    }
}
