//! Certificates the cluster makes itself: the router's default certificate and the
//! controller's certificate for `controller.$CLUSTER_DOMAIN`, whose pin `flynn cluster add`
//! takes (as in Flynn: base64 of the SHA-256 of the certificate's DER).

use anyhow::Context;
use base64::Engine;

pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
    /// base64(SHA-256(DER)) of the certificate.
    pub pin: String,
}

/// A self-signed ECDSA P-256 certificate for `names`.
pub fn self_signed(names: &[String]) -> anyhow::Result<SelfSigned> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("making a key pair")?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).context("certificate names")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2120, 1, 1);
    let cert = params
        .self_signed(&key)
        .context("signing the certificate")?;
    Ok(SelfSigned {
        pin: pin(cert.der()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The pin of the first certificate in a PEM text.
pub fn pem_pin(pem: &str) -> Option<String> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()?;
    Some(pin(&der))
}

/// The pin of a DER certificate: base64 of its SHA-256.
pub fn pin(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}
