//! The policy decision over any policy the parser accepts: every pod, with no selector and
//! with each identity's client id. Invariants: a token is only ever allowed for an identity
//! bound to the pod, of the pod's own namespace, matching the selector asked for.
#![no_main]

use imds_agent::{
    policy::{Decision, Selector},
    sources::manifests::parse,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(snapshot) = parse(std::path::Path::new("fuzz.yaml"), &text) else { return };
    let client_ids: Vec<String> = snapshot.identities().map(|i| i.client_id.clone()).collect();
    for pod in snapshot.pods() {
        let bound: Vec<(String, String)> =
            snapshot.bound_identities(pod).iter().map(|(i, _)| (i.namespace.clone(), i.name.clone())).collect();
        let selectors = std::iter::once(None).chain(client_ids.iter().map(|c| Some(Selector::ClientId(c.clone()))));
        for selector in selectors {
            if let Decision::Allow { identity, .. } = snapshot.decide(&pod.uid, selector.as_ref()) {
                assert_eq!(identity.namespace, pod.namespace, "an identity of another namespace");
                assert!(
                    bound.contains(&(identity.namespace.clone(), identity.name.clone())),
                    "an identity not bound to the pod"
                );
                if let Some(Selector::ClientId(asked)) = &selector {
                    assert!(identity.client_id.eq_ignore_ascii_case(asked), "not the identity asked for");
                }
            }
        }
    }
});
