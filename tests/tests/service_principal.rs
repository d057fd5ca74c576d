//! aad-pod-identity's service-principal identities end to end (issue #5): `AzureIdentity`
//! type 1 (client secret) and type 2 (certificate), their Secrets read from the policy
//! source, tokens from (a fake) Entra with the client-credentials grant, answered in IMDS's
//! shape; `auxiliaryTenantIDs` answered as NMI did. The real Entra cannot be reached here;
//! `fake_entra` follows its contract and verifies certificate assertions as Entra does. Needs
//! root; run with `cargo xtask test`.
use std::net::{SocketAddr, SocketAddrV4};

use imds_tests::{
    fake_entra::{entra_token_for, verify_assertion, App, AppCredential, FakeEntra},
    fixtures::{self, Manifest},
    node::{curl, pod_uid, Fetched, Node, TestPod},
    Server, IMDS_IP,
};

const NS: &str = "app";
const T1: &str = "11111111-0000-4000-8000-000000000001";
const T2: &str = "22222222-0000-4000-8000-000000000002";
const SECRET_CLIENT: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const CERT_CLIENT: &str = "bbbbbbbb-0000-4000-8000-000000000002";
const SCOPE: &str = "https://vault.azure.net/.default";
const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/../imds-agent/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

fn secret(name: &str, data: &[(&str, &[u8])]) -> String {
    Manifest::new().with(&fixtures::secret(NS, name, data)).into_string()
}

/// An `AzureIdentity` of `kind` with its binding (selector = name).
fn identity(name: &str, kind: i64, client_id: &str, secret_ns: &str, secret: &str, aux: &[&str]) -> String {
    Manifest::new()
        .with(&fixtures::service_principal(NS, name, kind, (client_id, T1), (secret_ns, secret), aux))
        .with(&fixtures::binding(NS, &format!("{name}-binding"), name, name))
        .into_string()
}

fn pod(name: &str, uid: &str, selector: &str) -> String {
    Manifest::new().with(&fixtures::pod(NS, name, uid).bound_to(selector)).into_string()
}

fn token(node: &Node, pod: &TestPod) -> Fetched {
    curl(node, pod, SocketAddr::from((IMDS_IP, 80)), TOKEN, &["Metadata: true"])
}

fn assert_imds_shape(token: &serde_json::Value, client_id: &str) {
    assert_eq!(token["access_token"], entra_token_for(client_id, SCOPE), "{token}");
    for field in ["expires_in", "expires_on", "not_before", "resource", "token_type"] {
        assert!(token[field].is_string(), "{field} is a string in IMDS's shape: {token}");
    }
}

// 8
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn service_principals_get_tokens_with_their_secret_or_certificate() {
    let mut node = Node::new("sp", vec![]);
    let certificate = AppCredential::certificate(&fixture("sp-cert.der"), fixture("sp-cert.rsa-public.der"));
    let apps = vec![
        App { tenant: T1.into(), client_id: SECRET_CLIENT.into(), credential: AppCredential::Secret("s3cret".into()) },
        App { tenant: T2.into(), client_id: SECRET_CLIENT.into(), credential: AppCredential::Secret("s3cret".into()) },
        App { tenant: T1.into(), client_id: CERT_CLIENT.into(), credential: certificate.clone() },
    ];
    let entra = FakeEntra::serve(Server::bind(&node.ns, SocketAddrV4::new([10, 233, 0, 1].into(), 8443)), apps);
    let (secret_uid, cert_uid, aux_uid, stray_uid) = (pod_uid(), pod_uid(), pod_uid(), pod_uid());
    node.write_manifest(
        "policy.yaml",
        &(secret("sp-secret", &[("clientSecret", b"s3cret")])
            + &secret("sp-cert", &[("certificate", &fixture("sp-cert.pfx")), ("password", b"test-password")])
            + &identity("by-secret", 1, SECRET_CLIENT, NS, "sp-secret", &[])
            + &identity("by-cert", 2, CERT_CLIENT, NS, "sp-cert", &[])
            + &identity("multi-tenant", 1, SECRET_CLIENT, NS, "sp-secret", &[T2])
            + &identity("stray", 1, SECRET_CLIENT, "kube-system", "sp-secret", &[])
            + &pod("secret-pod", &secret_uid, "by-secret")
            + &pod("cert-pod", &cert_uid, "by-cert")
            + &pod("aux-pod", &aux_uid, "multi-tenant")
            + &pod("stray-pod", &stray_uid, "stray")),
    );
    let pods = [&secret_uid, &cert_uid, &aux_uid, &stray_uid].map(|u| node.pod(u));
    let [secret_pod, cert_pod, aux_pod, stray_pod] = &pods;
    node.start_agent(&["--authority-host", &entra.authority()]);

    // Type 1: the client secret went to Entra, the token came back in IMDS's shape.
    let fetched = token(&node, secret_pod);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert_imds_shape(&fetched.json(), SECRET_CLIENT);
    let sent = entra.requests();
    assert_eq!((sent.len(), sent[0].tenant.as_str()), (1, T1));
    assert_eq!(sent[0].form["client_secret"], "s3cret");
    assert_eq!((sent[0].form["client_id"].as_str(), sent[0].form["scope"].as_str()), (SECRET_CLIENT, SCOPE));
    assert_eq!(token(&node, secret_pod).status, 200);
    assert_eq!(entra.requests().len(), 1, "the repeat came from the cache");

    // Type 2: a client assertion signed with the certificate's key.
    let fetched = token(&node, cert_pod);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert_imds_shape(&fetched.json(), CERT_CLIENT);
    let sent = entra.requests();
    let form = &sent[1].form;
    assert_eq!(form["client_assertion_type"], "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
    assert!(!form.contains_key("client_secret"));
    let AppCredential::Certificate { public_key, x5t } = &certificate else { unreachable!() };
    let audience = format!("{}{T1}/oauth2/v2.0/token", entra.authority());
    let claims = verify_assertion(&form["client_assertion"], public_key, x5t, CERT_CLIENT, &audience)
        .unwrap_or_else(|e| panic!("the assertion must verify with the certificate's public key: {e:?}"));
    assert_eq!(claims["sub"], CERT_CLIENT);

    // auxiliaryTenantIDs: NMI's answer, a JSON array — the primary tenant's token, then the auxiliary's.
    let fetched = token(&node, aux_pod);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    let tokens = fetched.json();
    let tokens = tokens.as_array().unwrap_or_else(|| panic!("an array: {fetched:?}"));
    assert_eq!(tokens.len(), 2);
    for t in tokens {
        assert_imds_shape(t, SECRET_CLIENT);
    }
    assert!(entra.requests().iter().any(|r| r.tenant == T2), "the auxiliary tenant was asked");

    // A Secret outside the identity's namespace is never read: refused, nothing sent.
    let before = entra.requests().len();
    let refused = token(&node, stray_pod);
    assert_eq!((refused.status, refused.json()["error_description"].as_str()), (400, Some("Identity not found")));
    assert_eq!(entra.requests().len(), before);
    let reason = node.agent().decisions().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("outside the identity's namespace"), "{reason}");
    assert!(!node.agent().decisions().iter().any(|d| d.to_string().contains("s3cret")), "no secret in the log");
    drop(pods);
}
