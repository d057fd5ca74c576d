//! `deploy/` checked by real validators: the Kubernetes objects with kubernetes-validate
//! (strict, the schemas it bundles), the custom resources with jsonschema against our
//! generated CRDs — including aad-pod-identity's own examples, unchanged. Broken inputs are
//! checked too, so the validators are known to say no. The plain manifests are the Helm
//! chart's renderings (`cargo xtask render`; the test command fails when they drift), and so
//! is `tests/fixtures/helm/every-option.yaml`, the chart with every setting changed. Needs the
//! Python test clients (and Helm) that `cargo xtask setup` installs; run with
//! `cargo xtask test`.
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// (file, ok, errors) per file.
fn python() -> PathBuf {
    imds_tests::node::sdk_python().into()
}

fn validate(mode: &[&str], files: &[PathBuf]) -> Vec<(String, bool, Vec<String>)> {
    let out = std::process::Command::new(python())
        .arg(root().join("tests/deploy_validate.py"))
        .args(mode)
        .args(files)
        .output()
        .unwrap();
    assert!(out.status.success(), "validator crashed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let errors = v["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_owned()).collect();
            (v["file"].as_str().unwrap().to_owned(), v["ok"].as_bool().unwrap(), errors)
        })
        .collect()
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
#[ignore = "needs the Python test clients: run with `cargo xtask test`"]
fn kubernetes_objects_pass_strict_schema_validation() {
    let files: Vec<PathBuf> = [
        yaml_files("deploy/kubernetes"),
        yaml_files("deploy/crds"),
        vec![
            root().join("deploy/examples/pods.yaml"),
            root().join("deploy/networkpolicy/networkpolicy.yaml"),
            root().join("tests/fixtures/helm/every-option.yaml"),
        ],
    ]
    .concat();
    let results = validate(&["k8s"], &files);
    assert_eq!(results.len(), files.len());
    for (file, ok, errors) in results {
        assert!(ok, "{file}: {errors:?}");
    }
}

#[test]
#[ignore = "needs the Python test clients: run with `cargo xtask test`"]
fn custom_resources_validate_against_our_crds_including_aad_pod_identitys_examples() {
    let crds = root().join("deploy/crds");
    let files = [yaml_files("deploy/examples"), yaml_files("tests/fixtures/aad-pod-identity")].concat();
    for (file, ok, errors) in validate(&["cr", crds.to_str().unwrap()], &files) {
        assert!(ok, "{file}: {errors:?}");
    }
}

#[test]
#[ignore = "needs the Python test clients: run with `cargo xtask test`"]
fn the_validators_reject_broken_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let daemonset = std::fs::read_to_string(root().join("deploy/kubernetes/imds-filter.yaml")).unwrap();
    let broken_ds = dir.path().join("ds.yaml");
    std::fs::write(&broken_ds, daemonset.replace("hostNetwork: true", "hostNetwork: \"yes\"")).unwrap();
    let results = validate(&["k8s"], &[broken_ds]);
    assert!(!results[0].1, "a string hostNetwork must be rejected: {results:?}");

    let identity = std::fs::read_to_string(root().join("tests/fixtures/aad-pod-identity/azureidentity.yaml")).unwrap();
    let broken_id = dir.path().join("id.yaml");
    std::fs::write(&broken_id, identity.replace("type: 0", "type: zero")).unwrap();
    let crds = root().join("deploy/crds");
    let results = validate(&["cr", crds.to_str().unwrap()], &[broken_id]);
    assert!(!results[0].1 && results[0].2[0].contains("type"), "a non-integer type must be rejected: {results:?}");
}

// The CiliumNetworkPolicy examples, against the part of Cilium's schema they use (a CRD
// written from Cilium's API reference: `tests/fixtures/cilium/`), and a misspelt one refused.
#[test]
#[ignore = "needs the Python test clients: run with `cargo xtask test`"]
fn cilium_network_policies_validate() {
    let schemas = root().join("tests/fixtures/cilium");
    let example = root().join("deploy/networkpolicy/ciliumnetworkpolicy.yaml");
    for (file, ok, errors) in validate(&["cr", schemas.to_str().unwrap()], std::slice::from_ref(&example)) {
        assert!(ok, "{file}: {errors:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("cnp.yaml");
    let text = std::fs::read_to_string(&example).unwrap();
    std::fs::write(&broken, text.replace("- host", "- hosts").replace("port: \"8182\"", "port: 8182")).unwrap();
    let results = validate(&["cr", schemas.to_str().unwrap()], &[broken]);
    assert!(!results[0].1 && results[0].2.len() >= 2, "an unknown entity and a numeric port: {results:?}");
}

/// `helm template` of the chart with `args`: (succeeded, stderr).
fn helm_template(args: &[&str]) -> (bool, String) {
    let helm = python().with_file_name("helm");
    let out = std::process::Command::new(helm)
        .args(["template", "imds-filter", "deploy/helm/imds-filter", "--namespace", "imds-filter"])
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
#[ignore = "needs Helm from the test clients: run with `cargo xtask test`"]
fn the_chart_refuses_settings_the_agent_would_refuse() {
    assert!(helm_template(&[]).0, "the defaults render");
    let (ok, error) =
        helm_template(&["--set", "forwardAllPaths=true", "--set-json", r#"allowPaths=["/metadata/instance"]"#]);
    assert!(!ok && error.contains("allowPaths and forwardAllPaths exclude each other"), "{error}");
    let (ok, error) = helm_template(&["--set", "mode=block"]);
    assert!(!ok && error.contains("mode must be one of"), "{error}");
    let (ok, error) = helm_template(&["--set", "podGrace=2"]);
    assert!(!ok && error.contains("podGrace"), "{error}");
    let (ok, error) = helm_template(&["--set", "hostToken.enabled=true"]);
    assert!(!ok && error.contains("hostToken.enabled needs hostToken.callers"), "{error}");
    let (ok, error) = helm_template(&["--set", "hostToken.listen=0.0.0.0:2579"]);
    assert!(!ok && error.contains("hostToken"), "only loopback: {error}");
    let (ok, error) = helm_template(&["--set", "denyUnbond=true"]);
    assert!(!ok && error.contains("denyUnbond"), "a misspelt setting is an error, not ignored: {error}");
}
