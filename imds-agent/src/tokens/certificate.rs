//! A service principal's certificate credential (aad-pod-identity's `AzureIdentity` type 2):
//! the PKCS#12 bundle and its password from the identity's Secret (keys `certificate` and
//! `password`, as NMI read them), turned into signed client assertions for Entra.
//!
//! The assertion is the JWT Entra documents for certificate credentials: header `alg: RS256`
//! with `x5t`, the base64url SHA-1 thumbprint of the certificate; claims `aud` (the token
//! endpoint), `iss` = `sub` = the client id, `jti`, `nbf`, `iat` and a short `exp`. Signed with
//! ring.
use base64::Engine as _;
use p12_keystore::{KeyStore, Pkcs12ImportPolicy};
use ring::{
    digest,
    rand::SystemRandom,
    signature::{RsaKeyPair, RSA_PKCS1_SHA256},
};

/// How long an assertion is valid.
const ASSERTION_LIFETIME_SECS: u64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("the Secret's `certificate` is not a PKCS#12 bundle this password opens: {0}")]
    Pkcs12(String),
    #[error("the PKCS#12 bundle holds no private key with a certificate")]
    NoKeyChain,
    #[error("the certificate's private key is not an RSA key ring accepts: {0}")]
    Key(String),
    #[error("signing the client assertion failed")]
    Sign,
    #[error("the Secret has no `certificate` key")]
    NoCertificate,
    #[error("the Secret's `password` is not UTF-8")]
    Password,
}

/// Opens the Secret's bundle (`certificate`, `password`) and signs an assertion: done per
/// fetch, so the private key is in memory only while it is used.
pub fn assertion_from_secret(
    secret: &crate::secrets::SecretData,
    client_id: &str,
    audience: &str,
) -> Result<String, CertificateError> {
    let pfx = secret.get("certificate").ok_or(CertificateError::NoCertificate)?;
    let password =
        std::str::from_utf8(secret.get("password").unwrap_or_default()).map_err(|_| CertificateError::Password)?;
    CertificateCredential::from_pkcs12(pfx, password)?.assertion(client_id, audience, crate::tokens::token::unix_now())
}

/// A private key and its certificate's thumbprint.
pub struct CertificateCredential {
    key: RsaKeyPair,
    /// base64url(SHA-1(certificate DER)).
    x5t: String,
}

impl std::fmt::Debug for CertificateCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateCredential").field("x5t", &self.x5t).finish_non_exhaustive()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl CertificateCredential {
    /// From a PKCS#12 bundle (DER) and its password.
    pub fn from_pkcs12(pfx: &[u8], password: &str) -> Result<CertificateCredential, CertificateError> {
        let store = KeyStore::from_pkcs12(pfx, password, Pkcs12ImportPolicy::Strict)
            .map_err(|e| CertificateError::Pkcs12(e.to_string()))?;
        let (_, chain) = store.private_key_chain().ok_or(CertificateError::NoKeyChain)?;
        let certificate = chain.certs().first().ok_or(CertificateError::NoKeyChain)?;
        let key = RsaKeyPair::from_pkcs8(chain.key().as_der()).map_err(|e| CertificateError::Key(e.to_string()))?;
        let thumbprint = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, certificate.as_der());
        Ok(CertificateCredential { key, x5t: b64(thumbprint.as_ref()) })
    }

    /// A client assertion for `client_id` at the token endpoint `audience`, at `now` (Unix s).
    pub fn assertion(&self, client_id: &str, audience: &str, now: u64) -> Result<String, CertificateError> {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": self.x5t});
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut id).map_err(|_| CertificateError::Sign)?;
        let claims = serde_json::json!({
            "aud": audience, "iss": client_id, "sub": client_id, "jti": b64(&id),
            "nbf": now, "iat": now, "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let signing_input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), signing_input.as_bytes(), &mut signature)
            .map_err(|_| CertificateError::Sign)?;
        Ok(format!("{signing_input}.{}", b64(&signature)))
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

    use super::*;

    const PFX: &[u8] = include_bytes!("../../testdata/sp-cert.pfx");
    const LEGACY_PFX: &[u8] = include_bytes!("../../testdata/sp-cert-legacy.pfx");
    const CERT: &[u8] = include_bytes!("../../testdata/sp-cert.der");
    const PUBLIC: &[u8] = include_bytes!("../../testdata/sp-cert.rsa-public.der");

    fn decode(part: &str) -> Vec<u8> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()
    }

    #[test]
    fn assertions_are_signed_by_the_certificates_key_and_name_it() {
        for pfx in [PFX, LEGACY_PFX] {
            let credential = CertificateCredential::from_pkcs12(pfx, "test-password").unwrap();
            let audience = "https://login.microsoftonline.com/t1/oauth2/v2.0/token";
            let jwt = credential.assertion("client-1", audience, 1_800_000_000).unwrap();
            let parts: Vec<&str> = jwt.split('.').collect();
            assert_eq!(parts.len(), 3);
            let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).unwrap();
            let claims: serde_json::Value = serde_json::from_slice(&decode(parts[1])).unwrap();
            let thumbprint = b64(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, CERT).as_ref());
            assert_eq!((header["alg"].as_str(), header["x5t"].as_str()), (Some("RS256"), Some(thumbprint.as_str())));
            assert_eq!(
                (claims["aud"].as_str(), claims["iss"].as_str(), claims["sub"].as_str()),
                (Some(audience), Some("client-1"), Some("client-1"))
            );
            assert!(claims["exp"].as_u64().unwrap() > 1_800_000_000 && claims["jti"].is_string());
            let signed = format!("{}.{}", parts[0], parts[1]);
            UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, PUBLIC)
                .verify(signed.as_bytes(), &decode(parts[2]))
                .expect("the signature verifies with the certificate's public key");
        }
    }

    #[test]
    fn a_wrong_password_or_a_broken_bundle_is_a_clear_error() {
        let err = CertificateCredential::from_pkcs12(PFX, "wrong").unwrap_err();
        assert!(matches!(err, CertificateError::Pkcs12(_)), "{err}");
        let err = CertificateCredential::from_pkcs12(b"not a bundle", "x").unwrap_err();
        assert!(matches!(err, CertificateError::Pkcs12(_)), "{err}");
    }
}
