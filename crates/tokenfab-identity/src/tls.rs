//! TLS material for every listener and client, from PEM files.
//!
//! - A server (the control plane's gRPC and HTTP listeners) has a certificate and key;
//!   with a client CA it also asks clients for a certificate (optionally: tenants have
//!   none) and the agent service then requires one that names the calling node.
//! - A client (agent, CLI) trusts a CA (or, with none given, the public web PKI roots
//!   bundled from Mozilla's list), and an agent may present its own certificate.
//!
//! A node's certificate names it with a DNS subject alternative name equal to the node
//! name (`tokenfab admin` does not issue certificates: use your PKI, cert-manager, or
//! `openssl`; the tests use rcgen).

use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A TLS file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {cause}")]
    Read {
        what: &'static str,
        path: String,
        cause: String,
    },
    #[error("{what} {path} holds no PEM {expected}; give a PEM file (-----BEGIN {expected}-----)")]
    NoPem {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("the TLS certificate and key do not work together: {0}")]
    Config(String),
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.display().to_string(),
        cause: e.to_string(),
    })
}

fn pem(path: &Path, what: &'static str, expected: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = read(path, what)?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN") {
        return Err(TlsError::NoPem {
            what,
            path: path.display().to_string(),
            expected,
        });
    }
    Ok(bytes)
}

/// TLS for a gRPC server: its certificate chain and key, and, to ask clients for
/// certificates signed by it, a client CA.
pub fn grpc_server(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTlsConfig, TlsError> {
    let identity = Identity::from_pem(
        pem(cert, "the TLS certificate", "CERTIFICATE")?,
        pem(key, "the TLS key", "PRIVATE KEY")?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(pem(ca, "the client CA", "CERTIFICATE")?))
            // Tenants on the same port present no certificate; the agent service checks
            // that agents did.
            .client_auth_optional(true);
    }
    Ok(config)
}

/// TLS for a client of the control plane: the CA that signed its certificate (else the
/// bundled public roots), and this client's own certificate and key where it has them.
pub fn grpc_client(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<ClientTlsConfig, TlsError> {
    let mut config = ClientTlsConfig::new();
    config = match ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(pem(ca, "the CA certificate", "CERTIFICATE")?)),
        None => config.with_webpki_roots(),
    };
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(
            pem(cert, "the client certificate", "CERTIFICATE")?,
            pem(key, "the client key", "PRIVATE KEY")?,
        ));
    }
    Ok(config)
}

/// A rustls server configuration for an HTTP listener (no client certificates).
pub fn http_server(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem(cert, "the TLS certificate", "CERTIFICATE")?)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&pem(key, "the TLS key", "PRIVATE KEY")?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Whether a (verified) certificate names `node`: a DNS subject alternative name equal
/// to the node name, exactly (a wildcard name names no node).
pub fn names_node(cert_der: &[u8], node: &str) -> bool {
    let der = rustls_pki_types::CertificateDer::from(cert_der);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
        return false;
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(node) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
        && cert
            .valid_dns_names()
            .any(|n| !n.contains('*') && n.eq_ignore_ascii_case(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_only() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gpu-1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(names_node(cert.der(), "gpu-1"));
        assert!(!names_node(cert.der(), "gpu-2"));
        let wildcard = rcgen::CertificateParams::new(vec!["*.nodes.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(
            !names_node(wildcard.der(), "gpu-1.nodes.example"),
            "a wildcard names no node"
        );
        assert!(!names_node(b"not a certificate", "gpu-1"));
    }

    #[test]
    fn unusable_files_say_what_and_where() {
        let dir = std::env::temp_dir().join(format!("tokenfab-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let e = grpc_server(&junk, &junk, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the TLS certificate {} holds no PEM CERTIFICATE; give a PEM file (-----BEGIN CERTIFICATE-----)",
                junk.display()
            )
        );
        let e = grpc_client(Some(&dir.join("missing.pem")), None).unwrap_err();
        assert!(e.to_string().starts_with("cannot read the CA certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
