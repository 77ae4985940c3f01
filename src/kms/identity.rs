//! What a volume records about its key provider: identifiers only.
//!
//! The metadata DB lives in the backing directory, which users ship to
//! storage they do not trust, so it may name *which* key wraps the volume key
//! but never *how to reach it*: module paths, addresses, CA files, token
//! files, profiles and PINs come from the user's side (`--kms`, the
//! environment, the host configuration). A [`ProviderId`] holds exactly the
//! identifiers; turning it into something that connects
//! ([`ProviderId::bare_uri`]) leaves every connection setting to the
//! environment.

use std::collections::BTreeMap;
use std::fmt;

use super::KmsError;
use super::uri::{ProviderUri, percent_decode};

/// The key provider a volume was created with, by identifiers alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderId {
    /// A master key of the local keystore, by id.
    Local { key: String },
    /// An AWS KMS key: id, alias or ARN.
    AwsKms { key: String },
    /// A Vault/OpenBao Transit key: the secrets-engine mount and the key name.
    VaultTransit { mount: String, key: String },
    /// A secret key in a PKCS#11 token: token label (if any) and object label.
    Pkcs11 { token: Option<String>, object: String },
}

/// Escapes the characters that delimit URI parts, so identifiers round-trip.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' | '?' | '&' | ';' | '=' | '#' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl ProviderId {
    /// Reads the provider recorded in a volume. Volumes written by older
    /// versions recorded whole URIs: only their identifiers are kept, and
    /// everything else in them (addresses, module paths, files) is dropped
    /// unread.
    pub fn parse_recorded(recorded: &str) -> Result<Self, KmsError> {
        if let Some(rest) = recorded.strip_prefix("vault-transit:")
            && !rest.starts_with("http://")
            && !rest.starts_with("https://")
        {
            return Self::vault_id(recorded, rest);
        }
        Ok(ProviderUri::parse(recorded)?.id())
    }

    /// `vault-transit:MOUNT/KEY` (the mount may itself contain slashes).
    fn vault_id(whole: &str, rest: &str) -> Result<Self, KmsError> {
        let target = rest.split_once('?').map_or(rest, |(t, _)| t);
        match target.rsplit_once('/') {
            Some((mount, key)) if !mount.trim_matches('/').is_empty() && !key.is_empty() => {
                Ok(ProviderId::VaultTransit {
                    mount: percent_decode(mount.trim_matches('/'), whole)?,
                    key: percent_decode(key, whole)?,
                })
            }
            _ => Err(KmsError::BadUri {
                uri: whole.to_string(),
                reason: "expected vault-transit:MOUNT/KEY".into(),
            }),
        }
    }

    /// The provider's kind, as in URIs (`local`, `aws-kms`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderId::Local { .. } => "local",
            ProviderId::AwsKms { .. } => "aws-kms",
            ProviderId::VaultTransit { .. } => "vault-transit",
            ProviderId::Pkcs11 { .. } => "pkcs11",
        }
    }

    /// The master key's identifier, as `status` shows it.
    pub fn key_label(&self) -> &str {
        match self {
            ProviderId::Local { key } | ProviderId::AwsKms { key } | ProviderId::VaultTransit { key, .. } => key,
            ProviderId::Pkcs11 { object, .. } => object,
        }
    }

    /// Which version of the master key wrapped `blob`, where the provider's
    /// blob says it without a call: the local keystore's (a version field)
    /// and Vault's (`vault:vN:…`). AWS and PKCS#11 blobs do not say.
    pub fn wrapping_version(&self, blob: &crate::crypto::WrappedKey) -> Option<u32> {
        match self {
            ProviderId::Local { .. } => super::local::LocalProvider::blob_version(blob),
            ProviderId::VaultTransit { .. } => std::str::from_utf8(blob.as_bytes())
                .ok()?
                .strip_prefix("vault:v")?
                .split(':')
                .next()?
                .parse()
                .ok(),
            ProviderId::AwsKms { .. } | ProviderId::Pkcs11 { .. } => None,
        }
    }

    /// A URI naming this key with no connection settings at all: whatever
    /// it needs to connect comes from the environment.
    pub fn bare_uri(&self) -> ProviderUri {
        match self.clone() {
            ProviderId::Local { key } => ProviderUri::Local { key },
            ProviderId::AwsKms { key } => ProviderUri::AwsKms {
                key,
                query: BTreeMap::new(),
            },
            ProviderId::VaultTransit { mount, key } => ProviderUri::VaultTransit {
                address: None,
                mount,
                key,
                query: BTreeMap::new(),
            },
            ProviderId::Pkcs11 { token, object } => {
                let mut path = BTreeMap::new();
                if let Some(t) = token {
                    path.insert("token".to_string(), t);
                }
                path.insert("object".to_string(), object);
                ProviderUri::Pkcs11 {
                    path,
                    query: BTreeMap::new(),
                }
            }
        }
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderId::Local { key } => write!(f, "local:{}", escape(key)),
            ProviderId::AwsKms { key } => write!(f, "aws-kms:{}", escape(key)),
            ProviderId::VaultTransit { mount, key } => write!(f, "vault-transit:{}/{}", escape(mount), escape(key)),
            ProviderId::Pkcs11 { token, object } => {
                write!(f, "pkcs11:")?;
                if let Some(t) = token {
                    write!(f, "token={};", escape(t))?;
                }
                write!(f, "object={}", escape(object))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_uris_keep_identifiers_only() {
        let cases = [
            ("local:mk-1", "local:mk-1"),
            (
                "aws-kms:alias/k?endpoint=http%3A%2F%2F10.0.0.9%3A1&profile=evil",
                "aws-kms:alias/k",
            ),
            (
                "vault-transit:http://127.0.0.1:9/transit/k?token_file=/root/.vault-token",
                "vault-transit:transit/k",
            ),
            ("vault-transit:transit/k", "vault-transit:transit/k"),
            ("vault-transit:ns/transit/k", "vault-transit:ns/transit/k"),
            (
                "pkcs11:token=T;object=master?module-path=/backing/evil.so&pin-value=1234",
                "pkcs11:token=T;object=master",
            ),
        ];
        for (recorded, id) in cases {
            let parsed = ProviderId::parse_recorded(recorded).unwrap();
            assert_eq!(parsed.to_string(), id, "{recorded}");
            assert_eq!(ProviderId::parse_recorded(&parsed.to_string()).unwrap(), parsed);
        }
        for bad in ["vault-transit:k", "vault-transit:/k", "nothing", "pkcs11:token=x"] {
            assert!(ProviderId::parse_recorded(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn identifiers_with_delimiters_round_trip() {
        let id = ProviderId::Pkcs11 {
            token: Some("a;b=c".into()),
            object: "x?y&z%".into(),
        };
        assert_eq!(ProviderId::parse_recorded(&id.to_string()).unwrap(), id);
        let aws = ProviderId::AwsKms { key: "k?x".into() };
        assert_eq!(ProviderId::parse_recorded(&aws.to_string()).unwrap(), aws);
    }
}
