//! Answering for a workload-identity pod: its ServiceAccount's federated identity, exchanged
//! at Entra with **the pod's own** projected service-account token (see
//! `tokens::projected`), answered in IMDS's shape.
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::{
    handler::{answer_token, refusal, report_denial},
    AgentState,
};
use crate::{
    decisions::DecisionRecord,
    imds::ImdsError,
    tokens::{projected, token::unix_now, Fetch, Source, TokenKey},
};

/// The policy's decision for the pod.
pub(super) struct Workload<'a> {
    pub namespace: String,
    pub service_account: &'a str,
    pub client_id: &'a str,
    pub tenant_id: &'a str,
}

pub(super) async fn answer(
    who: &Workload<'_>,
    resource: &str,
    uid: &str,
    state: &AgentState,
    record: &mut DecisionRecord,
) -> Response<Full<Bytes>> {
    // The decision log's identity and reason are the policy decision's (set by the caller).
    let Workload { namespace, service_account, client_id, tenant_id } = who;
    // The pod's own service-account token: read for this pod only, checked against it.
    let (kubelet, pod_uid, ns, sa) =
        (state.kubelet_dir.clone(), uid.to_owned(), namespace.clone(), (*service_account).to_owned());
    let assertion =
        tokio::task::spawn_blocking(move || projected::read(&kubelet, &pod_uid, &ns, &sa, unix_now())).await;
    let assertion = match assertion {
        Ok(Ok(jwt)) => jwt,
        Ok(Err(e)) => {
            record.verdict = "deny";
            record.reason = format!("{}; {e}", record.reason);
            report_denial(state, record);
            return refusal(&ImdsError::bad_request(format!("Workload identity: {e}")));
        }
        Err(e) => {
            record.verdict = "error";
            record.reason = format!("{}; reading the pod's token failed: {e}", record.reason);
            return refusal(&ImdsError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error: "unknown",
                description: "retry".into(),
            });
        }
    };
    record.verdict = "allow";
    let key = TokenKey {
        source: Source::Workload {
            tenant_id: (*tenant_id).to_owned(),
            client_id: (*client_id).to_owned(),
            namespace: namespace.clone(),
            service_account: (*service_account).to_owned(),
        },
        resource: resource.to_owned(),
    };
    answer_token(state.tokens.get(key, uid, Fetch::Entra { assertion }).await, record)
}
