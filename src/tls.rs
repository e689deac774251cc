//! TLS: the listener's certificate (reloaded with the configuration) and the trust used for
//! `https://` upstreams. rustls with the ring provider; TLS 1.2 and 1.3 only.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The listener's certificate chain and key, as loaded with one snapshot.
#[derive(Clone)]
pub struct ServerCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub certified: Arc<CertifiedKey>,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

/// Reads a PEM chain and key and checks that they belong together.
pub fn load_server_cert(cert_path: &Path, key_path: &Path) -> Result<ServerCert, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key_path.display()))?;
    let signer = provider::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported private key in {}: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| format!("tls_cert and tls_key do not belong together: {e}"))?;
    Ok(ServerCert {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        certified: Arc::new(certified),
    })
}

/// A server configuration whose certificate comes from `resolver` at each handshake, so a
/// reload changes the certificate for new connections without touching open ones.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Picks the certificate of the snapshot in force.
pub struct CurrentCert<F>(pub F);

impl<F> fmt::Debug for CurrentCert<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl<F> ResolvesServerCert for CurrentCert<F>
where
    F: Fn() -> Option<Arc<CertifiedKey>> + Send + Sync,
{
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.0)()
    }
}

/// Trust for `https://` upstreams: the system's roots, or only the CA in `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read CA certificates from {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("{} holds no usable CA certificate", path.display()));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::warn!(%error, "could not load some system CA certificates");
            }
            roots.add_parsable_certificates(native.certs);
        }
    }
    // No ALPN here: the connector sets it from the protocols it enables (HTTP/1.1).
    let config = ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The system's roots, loaded once per process: every `https://` upstream without a `ca_file`
/// shares them. Without any, such upstreams answer 502.
pub fn system_trust() -> Arc<ClientConfig> {
    static SYSTEM: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
    Arc::clone(SYSTEM.get_or_init(|| {
        client_config(None).unwrap_or_else(|error| {
            tracing::warn!(%error, "no TLS trust for https upstreams");
            no_trust()
        })
    }))
}

/// A client configuration that trusts nothing, for clients that never speak TLS.
pub fn no_trust() -> Arc<ClientConfig> {
    // With only the ring provider compiled in, rustls picks it without a process default.
    Arc::new(ClientConfig::builder().with_root_certificates(RootCertStore::empty()).with_no_client_auth())
}
