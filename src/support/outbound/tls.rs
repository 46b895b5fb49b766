//! The TLS set-up every outbound client shares, with the system's CA certificates loaded on
//! the first handshake instead of at start-up.
//!
//! reqwest's own rustls set-up checks servers with `rustls-platform-verifier`, which on
//! Linux reads and parses the system's CA bundle and every file under `/etc/ssl/certs`
//! (`rustls-native-certs`) when the verifier is made, that is for each client built. The
//! handler builds two clients at start-up (pooled and unpooled) and calls nothing over TLS
//! before its first request: about 300 file reads on Debian, most of a cold start. Here the
//! same platform verifier is made once, by the first handshake that needs it, and shared;
//! the configuration is otherwise what reqwest builds (TLS 1.2 and 1.3, its crypto provider
//! aws-lc-rs, ALPN `h2` then `http/1.1`). A certificate added to the system afterwards needs
//! a restart, as with reqwest's own set-up.

use std::sync::{Arc, LazyLock, OnceLock};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// The configuration for [`reqwest::ClientBuilder::tls_backend_preconfigured`].
pub(super) fn config() -> Result<rustls::ClientConfig, rustls::Error> {
    CONFIG.clone()
}

static CONFIG: LazyLock<Result<rustls::ClientConfig, rustls::Error>> = LazyLock::new(|| {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(LazyPlatformVerifier { provider: provider.clone(), inner: OnceLock::new() });
    // `dangerous()` is rustls' door for any verifier of one's own; this one is the platform
    // verifier reqwest itself installs the same way, only made later.
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
});

/// The platform verifier, made on first use.
#[derive(Debug)]
struct LazyPlatformVerifier {
    provider: Arc<CryptoProvider>,
    inner: OnceLock<Result<rustls_platform_verifier::Verifier, rustls::Error>>,
}

impl LazyPlatformVerifier {
    fn get(&self) -> Result<&rustls_platform_verifier::Verifier, rustls::Error> {
        self.inner
            .get_or_init(|| rustls_platform_verifier::Verifier::new(self.provider.clone()))
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl ServerCertVerifier for LazyPlatformVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.get()?.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls13_signature(message, cert, dss)
    }

    /// What the platform verifier answers too (its WebPKI verifier's schemes are the
    /// provider's), without loading the certificates to say it.
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
