//! The small blocking HTTP client the remote providers share.

use std::time::Duration;

use ureq::Agent;
use ureq::tls::{PemItem, RootCerts, TlsConfig, parse_pem};

use super::KmsError;

/// An agent with bounded timeouts, non-2xx answers returned as responses,
/// and optionally a custom CA bundle (PEM).
pub fn agent(provider: &str, ca_file: Option<&str>) -> Result<Agent, KmsError> {
    let mut tls = TlsConfig::builder();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| KmsError::Config {
            provider: provider.to_string(),
            message: format!("cannot read CA bundle {path}: {e}"),
        })?;
        let certs: Vec<_> = parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(KmsError::Config {
                provider: provider.to_string(),
                message: format!("CA bundle {path} holds no PEM certificate"),
            });
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    Ok(Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(3)))
        .timeout_global(Some(Duration::from_secs(15)))
        .tls_config(tls.build())
        .build()
        .new_agent())
}

/// Exponential backoff for retried calls: 100 ms, 200 ms, 400 ms, …
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(6))
}

pub const MAX_ATTEMPTS: u32 = 4;
