//! A pod's own projected service-account token, read from the kubelet's pod directory —
//! the assertion the workload-identity bridge exchanges at Entra.
//!
//! The kubelet writes projected volumes to
//! `<kubelet>/pods/<pod UID>/volumes/kubernetes.io~projected/<volume>/<file>`; the
//! workload-identity webhook names both volume and file `azure-identity-token`. The pod UID
//! comes from the kernel's attribution of the connection, never from the request, and the
//! token is only used when its own claims agree: audience `api://AzureADTokenExchange`,
//! subject the pod's ServiceAccount, issued for that very pod, not expired. So a pod can only
//! ever be served tokens made from its own service-account token.
use std::{
    fs,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use serde::Deserialize;

/// The audience workload identity's federated credentials expect.
pub const AUDIENCE: &str = "api://AzureADTokenExchange";
/// The file name the webhook gives the token (in a volume of the same name).
pub const TOKEN_FILE: &str = "azure-identity-token";
/// Tokens are bounded: a service-account JWT is a few KiB.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProjectedTokenError {
    #[error(
        "no projected service-account token found for the pod (looked for {TOKEN_FILE} in its projected volumes under {0}); \
         mount one with audience {AUDIENCE}, as the workload-identity webhook does"
    )]
    Missing(PathBuf),
    #[error("the pod's projected token {0} is not a readable JWT: {1}")]
    Unreadable(PathBuf, String),
    #[error("the pod's projected token {path} is not for this pod and ServiceAccount: {problem}")]
    Mismatch { path: PathBuf, problem: String },
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Audience,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    exp: u64,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
    #[default]
    None,
}

#[derive(Debug, Deserialize)]
struct KubernetesClaims {
    pod: Option<NamedUid>,
}

#[derive(Debug, Deserialize)]
struct NamedUid {
    uid: String,
}

/// Reads and checks the projected token of pod `uid` (namespace `namespace`, ServiceAccount
/// `service_account`) under the kubelet directory `kubelet_dir`; `now` in Unix seconds.
pub fn read(
    kubelet_dir: &Path,
    uid: &str,
    namespace: &str,
    service_account: &str,
    now: u64,
) -> Result<String, ProjectedTokenError> {
    let pod_dir = kubelet_dir.join("pods").join(uid);
    let projected = pod_dir.join("volumes").join("kubernetes.io~projected");
    let mut candidates: Vec<PathBuf> = fs::read_dir(&projected)
        .map_err(|_| ProjectedTokenError::Missing(projected.clone()))?
        .filter_map(Result::ok)
        .map(|e| e.path().join(TOKEN_FILE))
        .filter(|p| p.is_file())
        .collect();
    candidates.sort(); // the webhook's own volume name sorts like any other: be deterministic
    let path = candidates.into_iter().next().ok_or_else(|| ProjectedTokenError::Missing(projected.clone()))?;
    // The kubelet's atomic writer links the file into `..data`; it must stay inside the pod's
    // directory.
    let real = fs::canonicalize(&path).map_err(|e| ProjectedTokenError::Unreadable(path.clone(), e.to_string()))?;
    let real_pod_dir = fs::canonicalize(&pod_dir).unwrap_or(pod_dir);
    if !real.starts_with(&real_pod_dir) {
        return Err(ProjectedTokenError::Mismatch { path, problem: "it links outside the pod's directory".into() });
    }
    let size = fs::metadata(&real).map_err(|e| ProjectedTokenError::Unreadable(path.clone(), e.to_string()))?.len();
    if size > MAX_TOKEN_BYTES {
        return Err(ProjectedTokenError::Unreadable(path, format!("{size} bytes is not a service-account token")));
    }
    let token = fs::read_to_string(&real).map_err(|e| ProjectedTokenError::Unreadable(path.clone(), e.to_string()))?;
    let token = token.trim().to_owned();
    check(&token, uid, namespace, service_account, now).map_err(|problem| match problem {
        Problem::Unreadable(p) => ProjectedTokenError::Unreadable(path.clone(), p),
        Problem::Mismatch(problem) => ProjectedTokenError::Mismatch { path: path.clone(), problem },
    })?;
    Ok(token)
}

enum Problem {
    Unreadable(String),
    Mismatch(String),
}

/// Checks a token's claims (the signature is Entra's to check).
fn check(token: &str, uid: &str, namespace: &str, service_account: &str, now: u64) -> Result<(), Problem> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Problem::Unreadable("not three dot-separated parts".into()));
    };
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| Problem::Unreadable(format!("payload is not base64url: {e}")))?;
    let claims: Claims = serde_json::from_slice(&payload)
        .map_err(|e| Problem::Unreadable(format!("payload is not JSON claims: {e}")))?;
    let audience_ok = match &claims.aud {
        Audience::One(a) => a == AUDIENCE,
        Audience::Many(all) => all.iter().any(|a| a == AUDIENCE),
        Audience::None => false,
    };
    if !audience_ok {
        return Err(Problem::Mismatch(format!("its audience is not {AUDIENCE}")));
    }
    let subject = format!("system:serviceaccount:{namespace}:{service_account}");
    if claims.sub != subject {
        return Err(Problem::Mismatch(format!("its subject is {:?}, not {subject:?}", claims.sub)));
    }
    let pod_uid = claims.kubernetes.and_then(|k| k.pod).map(|p| p.uid);
    if pod_uid.as_deref() != Some(uid) {
        return Err(Problem::Mismatch(format!("it was issued for pod {pod_uid:?}, not {uid:?}")));
    }
    if claims.exp <= now {
        return Err(Problem::Mismatch("it has expired (is the kubelet refreshing it?)".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3c9e1a7b-1111-4222-8333-444455556666";
    const NOW: u64 = 1_800_000_000;

    pub(super) fn jwt(claims: &serde_json::Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!("{}.{}.{}", b64(br#"{"alg":"RS256","kid":"k"}"#), b64(claims.to_string().as_bytes()), b64(b"sig"))
    }

    fn claims(aud: &str, sub: &str, pod_uid: &str, exp: u64) -> serde_json::Value {
        serde_json::json!({"aud": [aud], "sub": sub, "exp": exp,
            "kubernetes.io": {"namespace": "app", "pod": {"name": "web", "uid": pod_uid}, "serviceaccount": {"name": "fed", "uid": "s"}}})
    }

    fn kubelet_with(token: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("pods").join(UID).join("volumes/kubernetes.io~projected/azure-identity-token");
        fs::create_dir_all(volume.join("..2026_11_26_00_00_00.1")).unwrap();
        if let Some(token) = token {
            // The kubelet's atomic-writer layout: file -> ..data/file, ..data -> timestamped dir.
            fs::write(volume.join("..2026_11_26_00_00_00.1").join(TOKEN_FILE), token).unwrap();
            std::os::unix::fs::symlink("..2026_11_26_00_00_00.1", volume.join("..data")).unwrap();
            std::os::unix::fs::symlink(format!("..data/{TOKEN_FILE}"), volume.join(TOKEN_FILE)).unwrap();
        }
        dir
    }

    #[test]
    fn the_pods_own_token_is_read_and_its_claims_checked() {
        let good = jwt(&claims(AUDIENCE, "system:serviceaccount:app:fed", UID, NOW + 3600));
        let dir = kubelet_with(Some(&good));
        assert_eq!(read(dir.path(), UID, "app", "fed", NOW), Ok(good));

        let cases = [
            (claims("api://other", "system:serviceaccount:app:fed", UID, NOW + 60), "audience"),
            (claims(AUDIENCE, "system:serviceaccount:app:other", UID, NOW + 60), "subject"),
            (claims(AUDIENCE, "system:serviceaccount:app:fed", "another-pod", NOW + 60), "issued for pod"),
            (claims(AUDIENCE, "system:serviceaccount:app:fed", UID, NOW), "expired"),
        ];
        for (c, want) in cases {
            let dir = kubelet_with(Some(&jwt(&c)));
            let err = read(dir.path(), UID, "app", "fed", NOW).unwrap_err();
            assert!(matches!(&err, ProjectedTokenError::Mismatch { problem, .. } if problem.contains(want)), "{err}");
        }
        let dir = kubelet_with(Some("not-a-jwt"));
        assert!(matches!(read(dir.path(), UID, "app", "fed", NOW), Err(ProjectedTokenError::Unreadable(..))));
    }

    #[test]
    fn a_missing_token_is_a_clear_error() {
        let dir = kubelet_with(None);
        let err = read(dir.path(), UID, "app", "fed", NOW).unwrap_err();
        assert!(matches!(err, ProjectedTokenError::Missing(_)));
        assert!(err.to_string().contains(AUDIENCE), "says what to do: {err}");
        assert!(matches!(read(dir.path(), "no-such-pod", "app", "fed", NOW), Err(ProjectedTokenError::Missing(_))));
    }

    #[test]
    fn a_token_linking_outside_the_pod_is_refused() {
        let good = jwt(&claims(AUDIENCE, "system:serviceaccount:app:fed", UID, NOW + 3600));
        let dir = kubelet_with(None);
        let outside = dir.path().join("elsewhere");
        fs::write(&outside, &good).unwrap();
        let volume = dir.path().join("pods").join(UID).join("volumes/kubernetes.io~projected/azure-identity-token");
        std::os::unix::fs::symlink(&outside, volume.join(TOKEN_FILE)).unwrap();
        let err = read(dir.path(), UID, "app", "fed", NOW).unwrap_err();
        assert!(matches!(&err, ProjectedTokenError::Mismatch { problem, .. } if problem.contains("outside")), "{err}");
    }
}
