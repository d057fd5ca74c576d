//! The workload-identity bridge end to end (issue #5): a pod opting in to workload identity
//! gets tokens through its IMDS calls — exchanged at (a fake) Entra with **its own**
//! service-account token — with no sidecar and no iptables. The real Entra cannot be reached
//! here; `fake_entra` follows its contract. Needs root; run with `cargo xtask test`.
use std::net::{SocketAddr, SocketAddrV4};

use imds_tests::{
    fake_entra::{entra_token_for, App, AppCredential, FakeEntra},
    fixtures::{self, Manifest},
    node::{curl, pod_uid, sdk, Fetched, Node, TestPod},
    Server, IMDS_IP,
};

const NS: &str = "app";
const TENANT: &str = "72f988bf-0000-4000-8000-000000000001";
const WI_CLIENT: &str = "5f2c6b1e-0000-4000-8000-0000000000aa";
const OTHER_CLIENT: &str = "5f2c6b1e-0000-4000-8000-0000000000bb";
const VAULT: &str = "https://vault.azure.net";
const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";

fn service_account(name: &str, client_id: &str) -> String {
    Manifest::new().with(&fixtures::workload_service_account(NS, name, client_id, TENANT)).into_string()
}

fn wi_pod(name: &str, uid: &str, service_account: &str) -> String {
    let pod =
        fixtures::pod(NS, name, uid).label("azure.workload.identity/use", "true").service_account(service_account);
    Manifest::new().with(&pod).into_string()
}

fn token(node: &Node, pod: &TestPod, selector: &str) -> Fetched {
    curl(node, pod, SocketAddr::from((IMDS_IP, 80)), &format!("{TOKEN}{selector}"), &["Metadata: true"])
}

/// A node with the fake Entra in its namespace, the agent pointed at it.
fn node(tag: &str) -> (Node, FakeEntra) {
    let node = Node::new(tag, vec![]);
    let apps = vec![
        App {
            tenant: TENANT.into(),
            client_id: WI_CLIENT.into(),
            credential: AppCredential::Federated { subject: format!("system:serviceaccount:{NS}:fed") },
        },
        App {
            tenant: TENANT.into(),
            client_id: OTHER_CLIENT.into(),
            credential: AppCredential::Federated { subject: format!("system:serviceaccount:{NS}:other") },
        },
    ];
    let entra = FakeEntra::serve(Server::bind(&node.ns, SocketAddrV4::new([10, 233, 0, 1].into(), 8443)), apps);
    (node, entra)
}

// 6
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_workload_identity_pod_gets_tokens_made_from_its_own_service_account_token() {
    let (mut node, entra) = node("wi");
    let (wi_uid, sibling_uid, other_uid) = (pod_uid(), pod_uid(), pod_uid());
    node.write_manifest(
        "policy.yaml",
        &(service_account("fed", WI_CLIENT)
            + &service_account("other", OTHER_CLIENT)
            + &wi_pod("wi", &wi_uid, "fed")
            + &wi_pod("sibling", &sibling_uid, "fed")
            + &wi_pod("other", &other_uid, "other")),
    );
    let (wi, sibling, other) = (node.pod(&wi_uid), node.pod(&sibling_uid), node.pod(&other_uid));
    let wi_token = node.project_token(&wi_uid, NS, "fed");
    let other_token = node.project_token(&other_uid, NS, "other");
    // `sibling` shares the ServiceAccount but has no projected token.
    node.start_agent(&["--authority-host", &entra.authority()]);

    // The token, in IMDS's shape, from Entra, with the pod's own service-account token.
    let fetched = token(&node, &wi, "");
    assert_eq!(fetched.status, 200, "{fetched:?}");
    let body = fetched.json();
    assert_eq!(body["access_token"], entra_token_for(WI_CLIENT, &format!("{VAULT}/.default")));
    for field in ["expires_in", "expires_on", "not_before", "resource", "client_id", "token_type"] {
        assert!(body[field].is_string(), "IMDS's shape: {field} is a string: {body}");
    }
    assert_eq!((body["client_id"].as_str(), body["resource"].as_str()), (Some(WI_CLIENT), Some(VAULT)));
    let sent = entra.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].tenant, TENANT);
    let form = &sent[0].form;
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_assertion_type"], "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
    assert_eq!(form["client_assertion"], wi_token, "the pod's own token was presented");
    assert_eq!((form["client_id"].as_str(), form["scope"].as_str()), (WI_CLIENT, "https://vault.azure.net/.default"));
    assert!(node.fake.seen().is_empty(), "IMDS is never asked for a workload-identity token");

    // Naming its own client id is fine; another's is IMDS's 400, and nothing goes to Entra.
    assert_eq!(token(&node, &wi, &format!("&client_id={WI_CLIENT}")).status, 200);
    let refused = token(&node, &wi, &format!("&client_id={OTHER_CLIENT}"));
    assert_eq!((refused.status, refused.json()["error_description"].as_str()), (400, Some("Identity not found")));

    // Same ServiceAccount, no token file: a clear error, never the cached token of its sibling.
    let missing = token(&node, &sibling, "");
    assert_eq!(missing.status, 400, "{missing:?}");
    let text = missing.json()["error_description"].as_str().unwrap().to_owned();
    assert!(text.contains("projected service-account token") && text.contains("api://AzureADTokenExchange"), "{text}");

    // A pod of another ServiceAccount: its own identity, with its own token.
    let fetched = token(&node, &other, "");
    assert_eq!(fetched.json()["access_token"], entra_token_for(OTHER_CLIENT, &format!("{VAULT}/.default")));
    let sent = entra.requests();
    assert_eq!(sent.len(), 2, "the repeat was cached; the refusals never reached Entra");
    assert_eq!(sent[1].form["client_assertion"], other_token);

    let decisions = node.agent().decisions();
    assert_eq!(decisions[0]["identity"], format!("workload-identity:{NS}/fed"));
    assert!(!decisions.iter().any(|d| d.to_string().contains(&wi_token)), "no service-account token in the log");
    drop((wi, sibling, other));
}

// 7
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_python_sdk_uses_workload_identity_through_plain_managed_identity() {
    let (mut node, entra) = node("wisdk");
    let wi_uid = pod_uid();
    node.write_manifest("policy.yaml", &(service_account("fed", WI_CLIENT) + &wi_pod("wi", &wi_uid, "fed")));
    let wi = node.pod(&wi_uid);
    node.project_token(&wi_uid, NS, "fed");
    node.start_agent(&["--authority-host", &entra.authority()]);
    let out = sdk(&node, &wi, &["managed"]);
    assert_eq!(out["result"], "token", "{out}");
    assert_eq!(out["token"], entra_token_for(WI_CLIENT, &format!("{VAULT}/.default")));
    assert_eq!(entra.requests().len(), 1);
    drop(wi);
}
