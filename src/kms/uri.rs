//! Key provider URIs, as stored in a volume and given to `init --kms`:
//!
//! - `local:<key id or alias>`
//! - `aws-kms:<key id, alias/NAME or ARN>[?region=R&endpoint=URL&profile=P]`
//! - `vault-transit:<http(s)://host:port>/<mount>/<key>[?token_file=F&ca_cert=F]`
//! - `pkcs11:token=<label>;object=<label>?module-path=<path>&pin-source=<file:PATH|env:VAR>` (RFC 7512)

use std::collections::BTreeMap;

use super::KmsError;

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
        address: String,
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
        uri: uri.to_string(),
        reason: reason.to_string(),
    }
}

fn percent_decode(s: &str, uri: &str) -> Result<String, KmsError> {
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
                    query: pairs(query, '&', uri)?,
                })
            }
            "vault-transit" => {
                let (target, query) = split_query(rest);
                let (base, key) = target
                    .rsplit_once('/')
                    .ok_or_else(|| bad(uri, "expected ADDRESS/MOUNT/KEY"))?;
                let (address, mount) = base
                    .rsplit_once('/')
                    .ok_or_else(|| bad(uri, "expected ADDRESS/MOUNT/KEY"))?;
                if !(address.starts_with("http://") || address.starts_with("https://"))
                    || mount.is_empty()
                    || key.is_empty()
                {
                    return Err(bad(uri, "expected http(s)://HOST:PORT/MOUNT/KEY"));
                }
                Ok(ProviderUri::VaultTransit {
                    address: address.to_string(),
                    mount: mount.to_string(),
                    key: key.to_string(),
                    query: pairs(query, '&', uri)?,
                })
            }
            "pkcs11" => {
                let (path, query) = split_query(rest);
                let path = pairs(path, ';', uri)?;
                if !path.contains_key("object") && !path.contains_key("id") {
                    return Err(bad(uri, "missing object=<key label>"));
                }
                Ok(ProviderUri::Pkcs11 {
                    path,
                    query: pairs(query, '&', uri)?,
                })
            }
            other => Err(bad(uri, &format!("unknown provider `{other}`"))),
        }
    }

    /// The master key's identifier, as `status` shows it.
    pub fn key_label(&self) -> String {
        match self {
            ProviderUri::Local { key } | ProviderUri::AwsKms { key, .. } | ProviderUri::VaultTransit { key, .. } => {
                key.clone()
            }
            ProviderUri::Pkcs11 { path, .. } => path
                .get("object")
                .or_else(|| path.get("id"))
                .cloned()
                .unwrap_or_default(),
        }
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
                    (address.as_str(), mount.as_str(), key.as_str()),
                    ("https://vault.example:8200", "transit", "kmsfs")
                );
                assert_eq!(query["ca_cert"], "/etc/ca.pem");
            }
            other => panic!("{other:?}"),
        }
        let p = ProviderUri::parse(
            "pkcs11:token=My%20Token;object=master?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/pin",
        )
        .unwrap();
        assert_eq!(p.key_label(), "master");
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
            "vault-transit:127.0.0.1/transit/k",
            "pkcs11:token=x",
            "ftp:x",
            "aws-kms:k?x",
        ] {
            assert!(matches!(ProviderUri::parse(bad), Err(KmsError::BadUri { .. })), "{bad}");
        }
    }
}
