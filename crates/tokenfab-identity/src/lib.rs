//! # tokenfab-identity: who is calling
//!
//! - **Node tokens.** Every agent authenticates with a token bound to its node name:
//!   `tfn1.` followed by the hex HMAC-SHA256 of the node name under the cluster's agent
//!   secret. The control plane holds only the secret and recomputes the token of the
//!   node a call names, so a node given its own token can neither act as another node nor
//!   learn the secret. An agent given the secret itself derives its own token (and could
//!   derive any: give production nodes only their token, from
//!   `tokenfab admin node-token NAME`). Rotating the secret revokes every node token.
//! - **Tenant and operator tokens** are kept as SHA-256 digests: a configuration file may
//!   hold the digest instead of the token (`token_sha256`), and the server never keeps a
//!   token in memory in the clear after startup.
//!
//! Comparisons take the same time whatever the inputs share, so timing tells an attacker
//! nothing about how much of a guess was right.

pub mod tls;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// A secret (token, agent secret) that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

/// Prefix of node tokens (version 1 of the derivation).
pub const NODE_TOKEN_PREFIX: &str = "tfn1.";

/// A malformed secret or digest in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the agent secret is empty; set one (at least 16 characters) on the control plane")]
    EmptySecret,
    #[error("'{0}' is not a SHA-256 digest: write 64 hexadecimal characters (tokenfab admin hash-token prints one)")]
    BadDigest(String),
}

/// The token of `node` under the cluster's agent `secret`.
pub fn node_token(secret: &str, node: &str) -> String {
    format!("{NODE_TOKEN_PREFIX}{}", hex(&node_mac(secret, node)))
}

fn node_mac(secret: &str, node: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(b"tokenfab node token v1\0");
    mac.update(node.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Whether `token` is a node token (as opposed to, say, the secret itself).
pub fn is_node_token(token: &str) -> bool {
    token.starts_with(NODE_TOKEN_PREFIX)
}

/// Checks node tokens against the cluster's agent secret.
#[derive(Clone)]
pub struct NodeVerifier {
    secret: String,
}

impl std::fmt::Debug for NodeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeVerifier { .. }")
    }
}

impl NodeVerifier {
    pub fn new(secret: &str) -> Result<Self, IdentityError> {
        if secret.trim().is_empty() {
            return Err(IdentityError::EmptySecret);
        }
        // Trimmed as agents trim it: a secret from an environment variable or a file may
        // carry a line break.
        Ok(NodeVerifier {
            secret: secret.trim().into(),
        })
    }

    /// True when `token` is `node`'s token.
    pub fn verify(&self, node: &str, token: &str) -> bool {
        same(node_token(&self.secret, node).as_bytes(), token.as_bytes())
    }

    /// True when `token` is the secret itself (an agent of an older version sends it).
    pub fn is_secret(&self, token: &str) -> bool {
        same(self.secret.as_bytes(), token.trim().as_bytes())
    }
}

/// The SHA-256 digest of a token.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// A digest written as 64 hex characters.
pub fn parse_digest(hex_text: &str) -> Result<[u8; 32], IdentityError> {
    let t = hex_text.trim();
    let bad = || IdentityError::BadDigest(t.chars().take(80).collect());
    if t.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, chunk) in t.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without leaking, through timing, how long a matching prefix is.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_token_is_bound_to_its_node_and_its_secret() {
        let v = NodeVerifier::new("cluster-secret").unwrap();
        let t = node_token("cluster-secret", "gpu-1");
        assert!(t.starts_with("tfn1.") && t.len() == 5 + 64, "{t}");
        assert!(v.verify("gpu-1", &t));
        assert!(!v.verify("gpu-2", &t), "another node's name");
        assert!(
            !v.verify("gpu-1", &node_token("other-secret", "gpu-1")),
            "another cluster"
        );
        assert!(!v.verify("gpu-1", "cluster-secret"));
        assert!(v.is_secret("cluster-secret") && !v.is_secret(&t));
        // Stable across releases: agents and control planes of one version agree, and
        // tokens issued once stay valid.
        assert_eq!(node_token("s", "n"), "tfn1.".to_string() + &hex(&node_mac("s", "n")));
        assert_eq!(NodeVerifier::new(" ").unwrap_err(), IdentityError::EmptySecret);
        assert!(!format!("{v:?}").contains("cluster-secret"));
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(<redacted>)");
    }

    #[test]
    fn digests_read_back_from_hex() {
        let d = digest("s3cret");
        assert_eq!(parse_digest(&hex(&d)).unwrap(), d);
        assert_eq!(
            hex(&digest("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "SHA-256 test vector"
        );
        assert!(
            parse_digest("zz")
                .unwrap_err()
                .to_string()
                .contains("64 hexadecimal characters")
        );
        assert!(parse_digest(&"g".repeat(64)).is_err());
    }
}
