//! Key provider URIs, as the user gives them (`--kms`, the host
//! configuration). A volume records only the [`ProviderId`] part.
//!
//! - `local:<key id or alias>`
//! - `aws-kms:<key id, alias/NAME or ARN>[?region=R&endpoint=URL&profile=P&ca_cert=F&timeout=S]`
//! - `vault-transit:[<http(s)://host:port>/]<mount>/<key>[?token_file=F&ca_cert=F&timeout=S]`
//! - `pkcs11:[token=<label>;]object=<label>[?module-path=<path>&pin-source=<file:PATH|env:VAR>&pin-value=PIN&timeout=S]` (RFC 7512)

use std::collections::BTreeMap;

use super::KmsError;
use super::identity::ProviderId;

/// Query parameters whose values are secrets: never stored, never printed.
const SECRET_PARAMS: &[&str] = &["pin-value"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderUri {
    Local {
        key: String,
    },
    AwsKms {
        key: String,
        query: BTreeMap<String, String>,
    },
    VaultTransit {
        /// None: VAULT_ADDR (or BAO_ADDR) from the environment.
        address: Option<String>,
        mount: String,
        key: String,
        query: BTreeMap<String, String>,
    },
    Pkcs11 {
        path: BTreeMap<String, String>,
        query: BTreeMap<String, String>,
    },
}

fn bad(uri: &str, reason: &str) -> KmsError {
    KmsError::BadUri {
        uri: redact(uri),
        reason: reason.to_string(),
    }
}

pub(super) fn percent_decode(s: &str, uri: &str) -> Result<String, KmsError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| bad(uri, "truncated %-escape"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad(uri, "bad %-escape"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(uri, "not UTF-8 after %-decoding"))
}

fn pairs(s: &str, sep: char, uri: &str) -> Result<BTreeMap<String, String>, KmsError> {
    let mut out = BTreeMap::new();
    for part in s.split(sep).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(uri, &format!("`{part}` is not key=value")))?;
        out.insert(percent_decode(k, uri)?, percent_decode(v, uri)?);
    }
    Ok(out)
}

/// Refuses settings the provider does not know: a misspelt one (`edpoint=`)
/// would otherwise be ignored, and the call go where the default points,
/// credentials and all.
fn only_known(
    uri: &str,
    settings: BTreeMap<String, String>,
    known: &[&str],
) -> Result<BTreeMap<String, String>, KmsError> {
    match settings.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(bad(
            uri,
            &format!("unknown setting `{unknown}` (this provider takes {})", known.join(", ")),
        )),
        None => Ok(settings),
    }
}

const AWS_SETTINGS: &[&str] = &["region", "endpoint", "profile", "ca_cert", "timeout"];
const VAULT_SETTINGS: &[&str] = &["token_file", "ca_cert", "timeout"];
const PKCS11_ATTRIBUTES: &[&str] = &["token", "object"];
const PKCS11_SETTINGS: &[&str] = &["module-path", "pin-source", "pin-value", "timeout"];

fn split_query(rest: &str) -> (&str, &str) {
    rest.split_once('?').unwrap_or((rest, ""))
}

impl ProviderUri {
    pub fn parse(uri: &str) -> Result<Self, KmsError> {
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| bad(uri, "missing scheme (local:, aws-kms:, vault-transit:, pkcs11:)"))?;
        match scheme {
            "local" => Ok(ProviderUri::Local { key: rest.to_string() }),
            "aws-kms" => {
                let (key, query) = split_query(rest);
                if key.is_empty() {
                    return Err(bad(uri, "missing key id, alias or ARN"));
                }
                Ok(ProviderUri::AwsKms {
                    key: percent_decode(key, uri)?,
                    query: only_known(uri, pairs(query, '&', uri)?, AWS_SETTINGS)?,
                })
            }
            "vault-transit" => {
                let (target, query) = split_query(rest);
                let expected = || bad(uri, "expected [http(s)://HOST:PORT/]MOUNT/KEY");
                let (address, path) = match target.split_once("://") {
                    Some((scheme, after)) => {
                        if scheme != "http" && scheme != "https" {
                            return Err(expected());
                        }
                        let (host, path) = after.split_once('/').ok_or_else(expected)?;
                        if host.is_empty() {
                            return Err(expected());
                        }
                        (Some(format!("{scheme}://{host}")), path)
                    }
                    None => (None, target),
                };
                let (mount, key) = path.rsplit_once('/').ok_or_else(expected)?;
                let mount = mount.trim_matches('/');
                if mount.is_empty() || key.is_empty() {
                    return Err(expected());
                }
                if address.is_none() && mount.contains(':') {
                    return Err(bad(uri, "the address needs its scheme: http(s)://HOST:PORT/MOUNT/KEY"));
                }
                Ok(ProviderUri::VaultTransit {
                    address,
                    mount: percent_decode(mount, uri)?,
                    key: percent_decode(key, uri)?,
                    query: only_known(uri, pairs(query, '&', uri)?, VAULT_SETTINGS)?,
                })
            }
            "pkcs11" => {
                let (path, query) = split_query(rest);
                let path = only_known(uri, pairs(path, ';', uri)?, PKCS11_ATTRIBUTES)?;
                if !path.contains_key("object") {
                    return Err(bad(uri, "missing object=<key label>"));
                }
                Ok(ProviderUri::Pkcs11 {
                    path,
                    query: only_known(uri, pairs(query, '&', uri)?, PKCS11_SETTINGS)?,
                })
            }
            other => Err(bad(uri, &format!("unknown provider `{other}`"))),
        }
    }

    /// The identifiers of the key this URI names: what a volume records.
    pub fn id(&self) -> ProviderId {
        match self {
            ProviderUri::Local { key } => ProviderId::Local { key: key.clone() },
            ProviderUri::AwsKms { key, .. } => ProviderId::AwsKms { key: key.clone() },
            ProviderUri::VaultTransit { mount, key, .. } => ProviderId::VaultTransit {
                mount: mount.clone(),
                key: key.clone(),
            },
            ProviderUri::Pkcs11 { path, .. } => ProviderId::Pkcs11 {
                token: path.get("token").cloned(),
                object: path.get("object").cloned().unwrap_or_default(),
            },
        }
    }

    /// True when the URI carries a secret (a PIN) that must not be stored.
    pub fn has_secret(&self) -> bool {
        match self {
            ProviderUri::AwsKms { query, .. }
            | ProviderUri::VaultTransit { query, .. }
            | ProviderUri::Pkcs11 { query, .. } => SECRET_PARAMS.iter().any(|p| query.contains_key(*p)),
            ProviderUri::Local { .. } => false,
        }
    }
}

/// The URI with the values of secret parameters replaced, fit for error
/// messages, logs and the host configuration. Values of settings no
/// provider knows are replaced too: a misspelt `pin-value` is still a PIN.
pub fn redact(uri: &str) -> String {
    let (head, query) = match uri.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (uri, None),
    };
    let shown = |k: &str| {
        let k = decoded(k);
        !SECRET_PARAMS.contains(&k.as_str())
            && [AWS_SETTINGS, VAULT_SETTINGS, PKCS11_SETTINGS]
                .iter()
                .any(|known| known.contains(&k.as_str()))
    };
    let redacted = |parts: &str, sep: char, shown: &dyn Fn(&str) -> bool| -> String {
        parts
            .split(sep)
            .map(|part| match part.split_once('=') {
                Some((k, _)) if !shown(k) => format!("{k}=<redacted>"),
                _ => part.to_string(),
            })
            .collect::<Vec<_>>()
            .join(&sep.to_string())
    };
    // A PKCS#11 path attribute that is none of the known ones may be a PIN
    // given in the wrong place.
    let head = match head.split_once(':') {
        Some(("pkcs11", path)) => format!(
            "pkcs11:{}",
            redacted(path, ';', &|k| PKCS11_ATTRIBUTES.contains(&decoded(k).as_str()))
        ),
        _ => head.to_string(),
    };
    match query {
        Some(query) => format!("{head}?{}", redacted(query, '&', &shown)),
        None => head,
    }
}

/// A setting's name as the parser sees it (%-escapes decoded); undecodable
/// names come out as themselves, which no list holds.
fn decoded(k: &str) -> String {
    percent_decode(k, "").unwrap_or_else(|_| k.to_string())
}

/// The URI without its secret parameters: what the host configuration keeps.
pub fn without_secrets(uri: &str) -> String {
    let Some((head, query)) = uri.split_once('?') else {
        return uri.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|part| !SECRET_PARAMS.contains(&decoded(part.split_once('=').map_or(*part, |(k, _)| k)).as_str()))
        .collect();
    if kept.is_empty() {
        head.to_string()
    } else {
        format!("{head}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_provider_and_rejects_bad_uris() {
        assert_eq!(
            ProviderUri::parse("local:mk-1").unwrap(),
            ProviderUri::Local { key: "mk-1".into() }
        );
        match ProviderUri::parse("aws-kms:alias/backup?region=eu-west-1&endpoint=http%3A%2F%2F127.0.0.1%3A5000")
            .unwrap()
        {
            ProviderUri::AwsKms { key, query } => {
                assert_eq!(key, "alias/backup");
                assert_eq!(query["endpoint"], "http://127.0.0.1:5000");
            }
            other => panic!("{other:?}"),
        }
        match ProviderUri::parse("aws-kms:arn:aws:kms:us-east-1:111122223333:key/1234abcd").unwrap() {
            ProviderUri::AwsKms { key, .. } => assert_eq!(key, "arn:aws:kms:us-east-1:111122223333:key/1234abcd"),
            other => panic!("{other:?}"),
        }
        match ProviderUri::parse("vault-transit:https://vault.example:8200/transit/kmsfs?ca_cert=/etc/ca.pem").unwrap()
        {
            ProviderUri::VaultTransit {
                address,
                mount,
                key,
                query,
            } => {
                assert_eq!(
                    (address.as_deref(), mount.as_str(), key.as_str()),
                    (Some("https://vault.example:8200"), "transit", "kmsfs")
                );
                assert_eq!(query["ca_cert"], "/etc/ca.pem");
            }
            other => panic!("{other:?}"),
        }
        let p = ProviderUri::parse(
            "pkcs11:token=My%20Token;object=master?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/pin",
        )
        .unwrap();
        assert_eq!(p.id().key_label(), "master");
        match p {
            ProviderUri::Pkcs11 { path, query } => {
                assert_eq!(path["token"], "My Token");
                assert_eq!(query["pin-source"], "file:/pin");
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "nothing",
            "aws-kms:",
            "vault-transit:127.0.0.1:8200/transit/k",
            "pkcs11:token=x",
            "ftp:x",
            "aws-kms:k?x",
            "vault-transit:ftp://h/transit/k",
            "vault-transit:k",
            "pkcs11:id=%01",
            "aws-kms:alias/x?edpoint=http://127.0.0.1:5099",
            "vault-transit:transit/k?token_flie=/t",
            "pkcs11:serial=1;object=m",
            "pkcs11:object=m?pin-valu=1234",
        ] {
            assert!(matches!(ProviderUri::parse(bad), Err(KmsError::BadUri { .. })), "{bad}");
        }
        for leaky in ["pkcs11:object=m;pin-value=1234", "pkcs11:object=m;pin%2Dvalue=1234"] {
            let said = ProviderUri::parse(leaky).unwrap_err().to_string();
            assert!(!said.contains("1234"), "{said}");
        }
        let escaped = "pkcs11:object=m?pin%2Dvalue=1234";
        assert!(ProviderUri::parse(escaped).unwrap().has_secret());
        assert!(!redact(escaped).contains("1234") && !without_secrets(escaped).contains("1234"));
        let misspelt = ProviderUri::parse("pkcs11:object=m?pin-valu=1234")
            .unwrap_err()
            .to_string();
        assert!(
            misspelt.contains("unknown setting `pin-valu`") && !misspelt.contains("1234"),
            "{misspelt}"
        );
    }

    #[test]
    fn vault_address_is_optional_and_secrets_are_redacted() {
        match ProviderUri::parse("vault-transit:transit/kmsfs").unwrap() {
            ProviderUri::VaultTransit {
                address, mount, key, ..
            } => {
                assert_eq!((address, mount.as_str(), key.as_str()), (None, "transit", "kmsfs"));
            }
            other => panic!("{other:?}"),
        }
        let uri = "pkcs11:object=m?module-path=/m.so&pin-value=1234&pin-source=env:X";
        assert!(ProviderUri::parse(uri).unwrap().has_secret());
        assert_eq!(
            redact(uri),
            "pkcs11:object=m?module-path=/m.so&pin-value=<redacted>&pin-source=env:X"
        );
        assert_eq!(
            without_secrets(uri),
            "pkcs11:object=m?module-path=/m.so&pin-source=env:X"
        );
        assert_eq!(without_secrets("pkcs11:object=m?pin-value=1"), "pkcs11:object=m");
        let err = ProviderUri::parse("pkcs11:token=t?pin-value=1234")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("1234"), "{err}");
    }
}
