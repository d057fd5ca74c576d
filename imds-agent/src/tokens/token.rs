//! A token as IMDS answers it, kept so that it can be answered again later.
//!
//! IMDS's success body has every value as a string (`expires_in`, `expires_on`,
//! `not_before`…). A cached token is answered with the fields it came with, except the
//! relative lifetimes (`expires_in`, `ext_expires_in`), which are reduced by the time it
//! spent in the cache so that clients schedule their own refresh correctly.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value};

/// A token and when it was obtained.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    fields: Map<String, Value>,
    /// Unix seconds at which it was obtained (by our clock).
    pub obtained_at: u64,
    /// Unix seconds at which it expires (`expires_on`).
    pub expires_on: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenParseError {
    #[error("the token answer is not a JSON object")]
    NotAnObject,
    #[error("the token answer has no access_token")]
    NoAccessToken,
    #[error("the token answer has no usable expiry (expires_on or expires_in)")]
    NoExpiry,
}

/// A string or number field as whole seconds (IMDS sends strings, Entra numbers).
fn seconds(fields: &Map<String, Value>, name: &str) -> Option<u64> {
    match fields.get(name)? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Token {
    /// Parses IMDS's success body, obtained at `now` (Unix seconds). `expires_on` is
    /// preferred; without it `expires_in` counts from `now`.
    pub fn from_imds(body: &[u8], now: u64) -> Result<Token, TokenParseError> {
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
            return Err(TokenParseError::NotAnObject);
        };
        if !fields.get("access_token").is_some_and(Value::is_string) {
            return Err(TokenParseError::NoAccessToken);
        }
        let expires_on = seconds(&fields, "expires_on")
            .or_else(|| seconds(&fields, "expires_in").map(|s| now + s))
            .ok_or(TokenParseError::NoExpiry)?;
        Ok(Token { fields, obtained_at: now, expires_on })
    }

    /// Builds IMDS's shape from a token obtained elsewhere (Entra): every value a string,
    /// `expires_on` and `not_before` computed, `resource` and `client_id` filled in.
    pub fn from_parts(
        access_token: &str,
        token_type: &str,
        expires_in: u64,
        client_id: &str,
        resource: &str,
        now: u64,
    ) -> Token {
        let mut fields = Map::new();
        let s = |v: String| Value::String(v);
        fields.insert("access_token".into(), s(access_token.to_owned()));
        fields.insert("client_id".into(), s(client_id.to_owned()));
        fields.insert("expires_in".into(), s(expires_in.to_string()));
        fields.insert("expires_on".into(), s((now + expires_in).to_string()));
        fields.insert("ext_expires_in".into(), s(expires_in.to_string()));
        fields.insert("not_before".into(), s(now.to_string()));
        fields.insert("resource".into(), s(resource.to_owned()));
        fields.insert("token_type".into(), s(token_type.to_owned()));
        Token { fields, obtained_at: now, expires_on: now + expires_in }
    }

    /// Seconds of validity left at `now`.
    pub fn remaining(&self, now: u64) -> Duration {
        Duration::from_secs(self.expires_on.saturating_sub(now))
    }

    /// Its whole lifetime as issued.
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(self.expires_on.saturating_sub(self.obtained_at))
    }

    /// The body to answer at `now`: as received, relative lifetimes reduced by the age.
    pub fn body(&self, now: u64) -> Bytes {
        let age = now.saturating_sub(self.obtained_at);
        let mut fields = self.fields.clone();
        for name in ["expires_in", "ext_expires_in"] {
            if let Some(v) = seconds(&fields, name) {
                fields.insert(name.into(), Value::String(v.saturating_sub(age).to_string()));
            }
        }
        Bytes::from(Value::Object(fields).to_string())
    }

    /// Bytes held, roughly (for the cache's memory accounting).
    pub fn size(&self) -> usize {
        self.fields.iter().map(|(k, v)| k.len() + v.as_str().map_or(16, str::len) + 32).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_114_900;

    fn imds_body() -> Vec<u8> {
        serde_json::json!({"access_token": "eyJ0", "client_id": "c1", "expires_in": "86399",
            "expires_on": (NOW + 86_399).to_string(), "ext_expires_in": "86399", "not_before": NOW.to_string(),
            "resource": "https://vault.azure.net", "token_type": "Bearer", "refresh_token": ""})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn imds_answers_round_trip_with_lifetimes_reduced_by_age() {
        let t = Token::from_imds(&imds_body(), NOW).unwrap();
        assert_eq!(t.expires_on, NOW + 86_399);
        let fresh: Value = serde_json::from_slice(&t.body(NOW)).unwrap();
        assert_eq!(fresh, serde_json::from_slice::<Value>(&imds_body()).unwrap());
        let later: Value = serde_json::from_slice(&t.body(NOW + 3_600)).unwrap();
        assert_eq!(later["expires_in"], "82799");
        assert_eq!(later["ext_expires_in"], "82799");
        assert_eq!(later["expires_on"], (NOW + 86_399).to_string(), "absolute times unchanged");
        assert_eq!(t.remaining(NOW + 86_400), Duration::ZERO);
    }

    #[test]
    fn answers_without_expiry_or_token_are_refused() {
        let parse = |v: Value| Token::from_imds(v.to_string().as_bytes(), NOW);
        assert_eq!(parse(serde_json::json!([])), Err(TokenParseError::NotAnObject));
        assert_eq!(parse(serde_json::json!({"expires_in": "10"})), Err(TokenParseError::NoAccessToken));
        assert_eq!(parse(serde_json::json!({"access_token": "x"})), Err(TokenParseError::NoExpiry));
        assert_eq!(parse(serde_json::json!({"access_token": "x", "expires_in": 60})).unwrap().expires_on, NOW + 60);
    }

    #[test]
    fn entra_tokens_take_imds_shape() {
        let t = Token::from_parts("at", "Bearer", 3599, "c1", "https://vault.azure.net", NOW);
        let v: Value = serde_json::from_slice(&t.body(NOW)).unwrap();
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
            assert!(v[field].is_string(), "{field} must be a string: {v}");
        }
        assert_eq!(v["expires_on"], (NOW + 3599).to_string());
    }
}
