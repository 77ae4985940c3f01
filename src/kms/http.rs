//! The small blocking HTTP client the remote providers share.

use std::time::{Duration, Instant};

use ureq::Agent;
use ureq::tls::{PemItem, RootCerts, TlsConfig, parse_pem};

use serde_json::Value;
use zeroize::Zeroizing;

use super::KmsError;

/// How long one provider call may take, retries included
/// (`KMSFS_PROVIDER_TIMEOUT`, seconds).
pub const TIMEOUT_ENV: &str = "KMSFS_PROVIDER_TIMEOUT";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// One attempt never waits longer than this: a retry may find another server.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long one attempt may wait within a call's `budget`: short enough that
/// a second attempt (and the backoff before it) fits in the budget too.
fn attempt_timeout(budget: Duration) -> Duration {
    ATTEMPT_TIMEOUT.min(budget.mul_f64(0.4))
}

/// The time budget of one provider call: `KMSFS_PROVIDER_TIMEOUT`, else the
/// provider URI's `timeout=` (kept per volume in the host configuration),
/// else 30 s; 1–600 seconds.
pub fn call_timeout(provider: &str, from_uri: Option<&str>) -> Result<Duration, KmsError> {
    let (name, value) = match (std::env::var(TIMEOUT_ENV), from_uri) {
        (Ok(v), _) => (TIMEOUT_ENV, v),
        (Err(_), Some(v)) => ("timeout= in the provider URI", v.to_string()),
        (Err(_), None) => return Ok(DEFAULT_TIMEOUT),
    };
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| (1.0..=600.0).contains(s))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| KmsError::BadSetting {
            name,
            message: format!("{value:?} for {provider}: give seconds from 1 to 600"),
        })
}

/// A remote provider's HTTP client: its agent, and the time one call may take.
pub struct Client {
    pub agent: Agent,
    budget: Duration,
}

impl Client {
    /// `uri_timeout`: the provider URI's `timeout=`, if any.
    pub fn new(provider: &str, ca_file: Option<&str>, uri_timeout: Option<&str>) -> Result<Self, KmsError> {
        let budget = call_timeout(provider, uri_timeout)?;
        Ok(Client {
            agent: agent(provider, ca_file, budget)?,
            budget,
        })
    }

    /// `call_with_retries` within this client's budget.
    pub fn call(
        &self,
        unreachable: &dyn Fn(String) -> KmsError,
        send: &mut dyn FnMut() -> Result<Result<ureq::http::Response<ureq::Body>, ureq::Error>, KmsError>,
        refusal: &Refusal<'_>,
    ) -> Result<Value, KmsError> {
        call_with_retries(self.budget, unreachable, send, refusal)
    }
}

/// An agent with bounded timeouts, non-2xx answers returned as responses,
/// and optionally a custom CA bundle (PEM).
fn agent(provider: &str, ca_file: Option<&str>, budget: Duration) -> Result<Agent, KmsError> {
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
        .timeout_connect(Some(Duration::from_secs(3).min(attempt_timeout(budget))))
        .timeout_global(Some(attempt_timeout(budget)))
        .tls_config(tls.build())
        .build()
        .new_agent())
}

/// Refuses plain `http://` to anything but this machine: a token or signed
/// request sent in clear across a network is readable by anyone on the path.
pub fn check_transport(provider: &str, url: &str) -> Result<(), KmsError> {
    let Some(rest) = url.strip_prefix("http://") else {
        return if url.starts_with("https://") {
            Ok(())
        } else {
            Err(KmsError::InsecureTransport {
                provider: provider.to_string(),
                url: url.to_string(),
                reason: "the address must start with https:// (or http:// to this machine)",
            })
        };
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(KmsError::InsecureTransport {
            provider: provider.to_string(),
            url: url.to_string(),
            reason: "plain http:// is only allowed to this machine (127.0.0.1, ::1, localhost); use https://",
        })
    }
}

/// Exponential backoff for retried calls: 100 ms, 200 ms, 400 ms, …
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(6))
}

const MAX_ATTEMPTS: u32 = 4;

/// What a provider makes of a non-2xx answer: the error, and whether to retry.
pub type Refusal<'a> = dyn Fn(u16, &Value) -> (KmsError, bool) + 'a;

/// Sends a request up to MAX_ATTEMPTS times with exponential backoff,
/// retrying transport errors and the answers `refusal` marks as retryable,
/// within the call's time budget (`call_timeout`). `send` builds and sends
/// one attempt (an Err from it is final, e.g. no credentials); a 2xx answer
/// is parsed as JSON.
fn call_with_retries(
    budget: Duration,
    unreachable: &dyn Fn(String) -> KmsError,
    send: &mut dyn FnMut() -> Result<Result<ureq::http::Response<ureq::Body>, ureq::Error>, KmsError>,
    refusal: &Refusal<'_>,
) -> Result<Value, KmsError> {
    let started = Instant::now();
    let mut last_error = None;
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            // No attempt starts that could run past the budget.
            let wait = backoff(attempt - 1);
            if started.elapsed() + wait + attempt_timeout(budget) > budget {
                break;
            }
            std::thread::sleep(wait);
        }
        let mut response = match send()? {
            Ok(r) => r,
            Err(ureq::Error::Timeout(_)) => {
                last_error = Some(unreachable(format!(
                    "no answer within {:.1} s, {} attempt(s) in {:.1} s (a call, retries included, \
                     may take {} s: {TIMEOUT_ENV} or timeout= in the provider URI)",
                    attempt_timeout(budget).as_secs_f64(),
                    attempt + 1,
                    started.elapsed().as_secs_f64(),
                    budget.as_secs_f64()
                )));
                continue;
            }
            Err(e) => {
                last_error = Some(unreachable(e.to_string()));
                continue;
            }
        };
        let status = response.status().as_u16();
        let text = Zeroizing::new(response.body_mut().read_to_string().unwrap_or_default());
        if (200..300).contains(&status) {
            return serde_json::from_str(&text).map_err(|e| unreachable(format!("bad JSON answer: {e}")));
        }
        let (error, retry) = refusal(status, &serde_json::from_str(&text).unwrap_or(Value::Null));
        if !retry {
            return Err(error);
        }
        last_error = Some(error);
    }
    Err(last_error.unwrap_or_else(|| unreachable("no attempt made".into())))
}

#[cfg(test)]
mod tests {
    use super::check_transport;

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "https://kms.eu-west-1.amazonaws.com",
            "http://127.0.0.1:8200",
            "http://127.9.9.9/x",
            "http://[::1]:5000/",
            "http://localhost:8200",
        ] {
            assert!(check_transport("p", ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8200",
            "http://vault.example:8200",
            "http://127.0.0.1.evil.example/",
            "http://localhost.evil.example",
            "http://127.0.0.1@evil.example/",
            "http://[::2]:1",
            "ftp://127.0.0.1",
            "127.0.0.1:8200",
        ] {
            assert!(check_transport("p", bad).is_err(), "{bad}");
        }
    }
}
