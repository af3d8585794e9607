//! The TLS settings of an HTTPS node: which CA certificates are trusted.

use std::sync::Arc;

use blockdev::{Error, Result};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::HttpOptions;

/// rustls settings for `opts`: the platform's CA store (as `SSL_CERT_FILE` / `SSL_CERT_DIR` may
/// redirect it) plus the certificates of `opts.ca_file`, or no verification at all when
/// `sslverify` is off. Mozilla's roots stand in when the platform has no store.
pub(crate) fn config(opts: &HttpOptions) -> Result<TlsConfig> {
    if !opts.ssl_verify {
        return Ok(TlsConfig::builder().disable_verification(true).build());
    }
    let mut roots: Vec<Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|der| Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    if let Some(path) = &opts.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| Error::from_io("open", e).prefixed(format!("Could not read CA file '{}'", path.display())))?;
        let before = roots.len();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(c)) => roots.push(c),
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::invalid_argument(format!("CA file '{}': {e}", path.display())));
                }
            }
        }
        if roots.len() == before {
            return Err(Error::invalid_argument(format!("CA file '{}' holds no certificate", path.display())));
        }
    }
    let roots = if roots.is_empty() { RootCerts::WebPki } else { RootCerts::Specific(Arc::new(roots)) };
    Ok(TlsConfig::builder().root_certs(roots).build())
}
