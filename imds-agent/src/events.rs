//! Kubernetes Events (with `--kube`), as `Warning`s in words their readers understand:
//! - on a pod whose token request was refused, so `kubectl describe pod` says why the SDK got
//!   "Identity not found";
//! - on a policy object the agent leaves out (an `AzureIdentity` without a client id, a
//!   binding without a selector), so `kubectl describe` says why it has no effect.
//!
//! Requests never wait on the API server: refusals go through a bounded queue (dropped when
//! full). Each pod and reason yields at most one Event per minute, saying how many were held
//! back; kube's recorder then aggregates repeats into one Event series.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client,
};
use tokio::sync::mpsc;

/// At most one Event per pod and reason in this window.
pub(crate) const WINDOW: Duration = Duration::from_mins(1);
/// Refusals waiting to become Events; beyond this they are dropped.
const QUEUE: usize = 256;
/// Keys kept by the limiter before stale ones are swept.
const MAX_KEYS: usize = 10_000;

/// A refusal to tell the pod's developer about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// Why, in words (the decision log's reason).
    pub reason: String,
}

/// A policy object the agent leaves out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// What is wrong with it.
    pub problem: String,
}

/// What becomes an Event.
#[derive(Clone, Debug)]
enum Notice {
    Denial(Denial),
    Ignored(Ignored),
}

/// The sending side, shared by request handlers and the policy source.
#[derive(Clone, Debug)]
pub struct DenialEvents(mpsc::Sender<Notice>);

impl DenialEvents {
    /// Queues an Event on a pod; never blocks, drops it if the queue is full.
    pub fn report(&self, denial: Denial) {
        let _ = self.0.try_send(Notice::Denial(denial));
    }

    /// Queues an Event on a policy object left out; never blocks, drops it if the queue is full.
    pub fn ignored(&self, ignored: Ignored) {
        let _ = self.0.try_send(Notice::Ignored(ignored));
    }
}

impl Notice {
    /// The object the Event is about, and the Event; `held` were held back before it.
    fn into_event(self, held: u32) -> (ObjectReference, Event) {
        let held_back = |what: &str| {
            if held > 0 {
                format!(" ({held} more such {what} in the last minute.)")
            } else {
                String::new()
            }
        };
        let reference = |api_version: &str, kind: &str, namespace: String, name: String, uid: &str| ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            name: Some(name),
            namespace: Some(namespace),
            uid: Some(uid.to_owned()),
            ..ObjectReference::default()
        };
        match self {
            Notice::Denial(d) => {
                let text = format!(
                    "Refused a request for an Azure managed-identity token: {}.{}",
                    d.reason,
                    held_back("refusals")
                );
                let event = Event {
                    type_: EventType::Warning,
                    reason: "ManagedIdentityRefused".into(),
                    note: Some(text),
                    action: "GetToken".into(),
                    secondary: None,
                };
                (reference("v1", "Pod", d.namespace, d.pod, &d.uid), event)
            }
            Notice::Ignored(i) => {
                let text = format!("Ignored by imds-filter: {}.", i.problem);
                let event = Event {
                    type_: EventType::Warning,
                    reason: "InvalidPolicyObject".into(),
                    note: Some(text),
                    action: "ReadPolicy".into(),
                    secondary: None,
                };
                (reference(&i.api_version, &i.kind, i.namespace, i.name, &i.uid), event)
            }
        }
    }

    /// The limiter's key: one Event per object and reason per window.
    fn key(&self) -> (String, String) {
        match self {
            Notice::Denial(d) => (d.uid.clone(), d.reason.clone()),
            // The object, not the problem's words: those carry values, and each edit would pass
            // the limit.
            Notice::Ignored(i) => (format!("{}/{}/{}", i.kind, i.namespace, i.name), "InvalidPolicyObject".to_owned()),
        }
    }
}

/// One Event per key per [`WINDOW`]; counts what it holds back.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    last: HashMap<(String, String), (Instant, u32)>,
}

impl Limiter {
    /// `Some(held back since the last one)` when an Event may go out now, else `None`.
    pub(crate) fn admit(&mut self, key: (String, String), now: Instant) -> Option<u32> {
        if self.last.len() >= MAX_KEYS {
            self.last.retain(|_, (at, _)| now.duration_since(*at) < WINDOW);
        }
        match self.last.get_mut(&key) {
            Some((at, held)) if now.duration_since(*at) < WINDOW => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let n = *held;
                (*at, *held) = (now, 0);
                Some(n)
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// Starts the Event writer for this client.
pub(crate) fn start(client: Client, instance: Option<String>) -> DenialEvents {
    let (tx, mut rx) = mpsc::channel::<Notice>(QUEUE);
    let recorder = Recorder::new(client, Reporter { controller: "imds-filter".into(), instance });
    tokio::spawn(async move {
        let mut limiter = Limiter::default();
        while let Some(notice) = rx.recv().await {
            let Some(held) = limiter.admit(notice.key(), Instant::now()) else {
                continue;
            };
            let (reference, event) = notice.into_event(held);
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, "could not record a Kubernetes Event");
            }
        }
    });
    DenialEvents(tx)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    #[test]
    fn one_event_per_pod_and_reason_per_window() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let key = |uid: &str, r: &str| (uid.to_owned(), r.to_owned());
        assert_eq!(l.admit(key("a", "no label"), t0), Some(0));
        assert_eq!(l.admit(key("a", "no label"), t0 + Duration::from_secs(1)), None);
        assert_eq!(l.admit(key("a", "no label"), t0 + Duration::from_secs(2)), None);
        // Another reason, another pod: their own budgets.
        assert_eq!(l.admit(key("a", "not bound"), t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(l.admit(key("b", "no label"), t0 + Duration::from_secs(2)), Some(0));
        // After the window: out again, saying how many were held back.
        assert_eq!(l.admit(key("a", "no label"), t0 + WINDOW + Duration::from_secs(1)), Some(2));
        assert_eq!(l.admit(key("a", "no label"), t0 + WINDOW + Duration::from_secs(2)), None);
    }

    /// Against a mocked API server: three refusals of one pod make one Event on that pod.
    #[tokio::test]
    async fn refusals_become_one_rate_limited_event_on_the_pod() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let posted: Arc<Mutex<Vec<(String, String, serde_json::Value)>>> = Arc::default();
        let seen = Arc::clone(&posted);
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (method, path) = (request.method().to_string(), request.uri().path().to_owned());
                let body = http_body_util::BodyExt::collect(request.into_body()).await.unwrap().to_bytes();
                let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
                seen.lock().unwrap().push((method, path, event.clone()));
                let mut answer = Response::new(Body::from(body.to_vec()));
                *answer.status_mut() = http::StatusCode::CREATED;
                send.send_response(answer);
            }
        });
        let events = start(Client::new(service, "default"), Some("node-1".into()));
        for _ in 0..3 {
            events.report(Denial {
                namespace: "shop".into(),
                pod: "batch".into(),
                uid: "8f4d2b6e".into(),
                reason: "the pod has no aadpodidbinding label".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let posted = posted.lock().unwrap().clone();
        assert_eq!(posted.len(), 1, "{posted:?}");
        let (method, path, event) = &posted[0];
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events"));
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "ManagedIdentityRefused");
        assert_eq!(
            (event["regarding"]["kind"].as_str(), event["regarding"]["name"].as_str()),
            (Some("Pod"), Some("batch"))
        );
        assert!(event["note"].as_str().unwrap().contains("no aadpodidbinding label"), "{event}");
    }
}
