//! HTTPS: rustls with the certificate chosen by SNI from the live route table (exact name,
//! then `*.` wildcard), a default certificate otherwise, TLS 1.2 and 1.3 only, session
//! resumption by tickets and a session cache, and ALPN `h2` / `http/1.1`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use flynn_model::Certificate;
use flynn_router_table::RouteTable;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate PEM: {0}")]
    Cert(String),
    #[error("private key PEM: {0}")]
    Key(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("reading {0}: {1}")]
    Read(std::path::PathBuf, std::io::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM chain and key into what rustls serves.
pub fn certified_key_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Cert("no certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
    Ok(CertifiedKey::from_der(chain, key, &provider())?)
}

pub fn certified_key(c: &Certificate) -> Result<CertifiedKey, TlsError> {
    certified_key_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes())
}

/// Picks the certificate for each handshake from the current route table.
#[derive(Debug)]
pub struct SniResolver {
    table: Arc<ArcSwap<RouteTable>>,
    default: Option<Arc<CertifiedKey>>,
    /// Parsed certificates by id, with the PEM they came from (a changed PEM is reparsed).
    parsed: Mutex<HashMap<String, (String, Arc<CertifiedKey>)>>,
}

impl SniResolver {
    pub fn new(table: Arc<ArcSwap<RouteTable>>, default: Option<Arc<CertifiedKey>>) -> Self {
        SniResolver {
            table,
            default,
            parsed: Mutex::default(),
        }
    }

    fn for_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        let cert = table.certificate(name)?;
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((pem, key)) = parsed.get(&cert.id) {
            if *pem == cert.cert_pem {
                return Some(key.clone());
            }
        }
        match certified_key(cert) {
            Ok(key) => {
                let key = Arc::new(key);
                parsed.insert(cert.id.clone(), (cert.cert_pem.clone(), key.clone()));
                Some(key)
            }
            Err(e) => {
                tracing::warn!(certificate = %cert.id, error = %e, "unusable certificate");
                None
            }
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .and_then(|n| self.for_name(n))
            .or_else(|| self.default.clone())
    }
}

/// The server configuration every HTTPS listener shares.
pub fn server_config(
    resolver: Arc<SniResolver>,
    h2: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(64 * 1024);
    Ok(Arc::new(cfg))
}

/// Loads the default certificate files, if configured.
pub fn default_key(
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<Option<Arc<CertifiedKey>>, TlsError> {
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(None);
    };
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| TlsError::Read(p.into(), e));
    Ok(Some(Arc::new(certified_key_pem(
        &read(cert)?,
        &read(key)?,
    )?)))
}
