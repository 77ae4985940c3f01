//! The `vault-transit` provider: HashiCorp Vault / OpenBao Transit. Data
//! keys come from `datakey/plaintext` with the volume's encryption context
//! as the key-derivation context (the transit key must be created with
//! `derived=true`); `rewrap` re-wraps under the key's newest version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::http::{Client, check_transport};
use super::{EncryptionContext, KeyProvider, KeyStatus, KmsError, ProviderId};
use crate::crypto::{SecretKey, WrappedKey};

pub struct VaultTransitProvider {
    address: String,
    mount: String,
    key: String,
    token: Zeroizing<String>,
    client: Client,
    calls: AtomicU64,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl VaultTransitProvider {
    /// `address` None: VAULT_ADDR (or BAO_ADDR) from the environment.
    pub fn new(
        address: Option<&str>,
        mount: &str,
        key: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<Self, KmsError> {
        let address = match address {
            Some(a) => a.to_string(),
            None => env("VAULT_ADDR")
                .or_else(|| env("BAO_ADDR"))
                .ok_or_else(|| KmsError::Config {
                    provider: format!("vault-transit ({mount}/{key})"),
                    message: "no Vault address: set VAULT_ADDR (or BAO_ADDR), give it in --kms \
                          (vault-transit:https://HOST:PORT/MOUNT/KEY), or run `kmsfs init --kms` on this host"
                        .into(),
                })?,
        };
        check_transport("vault-transit", &address)?;
        let config = |message: String| KmsError::Config {
            provider: format!("vault-transit ({address})"),
            message,
        };
        let token = match (env("VAULT_TOKEN").or_else(|| env("BAO_TOKEN")), query.get("token_file")) {
            (Some(t), _) => t,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| config(format!("cannot read token file {file}: {e}")))?
                .trim()
                .to_string(),
            (None, None) => env("HOME")
                .and_then(|h| std::fs::read_to_string(format!("{h}/.vault-token")).ok())
                .map(|t| t.trim().to_string())
                .ok_or_else(|| {
                    config("no token: set VAULT_TOKEN (or BAO_TOKEN), token_file= in the URI, or ~/.vault-token".into())
                })?,
        };
        let ca = query
            .get("ca_cert")
            .cloned()
            .or_else(|| env("VAULT_CACERT"))
            .or_else(|| env("BAO_CACERT"));
        Ok(VaultTransitProvider {
            address: address.trim_end_matches('/').to_string(),
            mount: mount.to_string(),
            key: key.to_string(),
            token: Zeroizing::new(token),
            client: Client::new("vault-transit", ca.as_deref(), query.get("timeout").map(String::as_str))?,
            calls: AtomicU64::new(0),
        })
    }

    fn unreachable(&self, cause: impl std::fmt::Display) -> KmsError {
        KmsError::Unreachable {
            provider: format!("vault-transit ({})", self.address),
            cause: cause.to_string(),
        }
    }

    fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, KmsError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}/v1/{}/{}", self.address, self.mount, path);
        let body = Zeroizing::new(body.map(|b| b.to_string()).unwrap_or_default());
        let mut send = || {
            Ok(if method == "GET" {
                self.client
                    .agent
                    .get(&url)
                    .header("X-Vault-Token", self.token.as_str())
                    .call()
            } else {
                self.client
                    .agent
                    .post(&url)
                    .header("X-Vault-Token", self.token.as_str())
                    .header("Content-Type", "application/json")
                    .send(body.as_bytes())
            })
        };
        let refusal = |status: u16, errors: &Value| {
            // Vault's messages are multi-line lists ("1 error occurred:\n\t* …").
            let mut message = errors["errors"]
                .as_array()
                .map(|e| e.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "))
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            if message.is_empty() && status == 404 {
                message = format!(
                    "no key {} in the transit engine at {} (deleted, or never made)",
                    self.key, self.mount
                );
            }
            if status >= 500 || status == 429 {
                // Sealed, in standby, overloaded: it may answer later, as an unreachable one may.
                let down = self.unreachable(format!("HTTP {status}: {message}"));
                return (down, true);
            }
            if status == 403 {
                // Separation of duties: name what the token's policy lacks.
                let capability = if method == "GET" { "read" } else { "update" };
                message = format!(
                    "{message} (the token's policy does not grant \"{capability}\" on {}/{path}, or the token is not valid)",
                    self.mount
                );
            }
            let refused = KmsError::Refused {
                provider: format!("vault-transit key {}/{}", self.mount, self.key),
                code: format!("HTTP {status}"),
                message,
            };
            (refused, false)
        };
        self.client.call(&|cause| self.unreachable(cause), &mut send, &refusal)
    }

    fn field<'a>(&self, v: &'a Value, name: &str) -> Result<&'a str, KmsError> {
        v["data"][name]
            .as_str()
            .ok_or_else(|| self.unreachable(format!("answer lacks data.{name}")))
    }

    fn plaintext_key(&self, v: &Value) -> Result<SecretKey, KmsError> {
        let plain = Zeroizing::new(
            B64.decode(self.field(v, "plaintext")?)
                .map_err(|_| self.unreachable("plaintext is not base64"))?,
        );
        SecretKey::from_slice(&plain).ok_or_else(|| self.unreachable("the data key is not 32 bytes"))
    }

    fn ciphertext(&self, wrapped: &WrappedKey) -> Result<String, KmsError> {
        String::from_utf8(wrapped.as_bytes().to_vec()).map_err(|_| KmsError::InvalidCiphertext(self.key.clone()))
    }
}

impl VaultTransitProvider {
    /// A transit key made without `derived=true` ignores the context that
    /// binds each volume key to its volume: refused before any volume key
    /// is made under it. A token that may not read the key's settings (a
    /// narrow policy) is let through.
    fn refuse_underived(&self) -> Result<(), KmsError> {
        let settings = match self.request("GET", &format!("keys/{}", self.key), None) {
            Ok(v) => v,
            Err(KmsError::Refused { code, .. }) if code == "HTTP 403" => {
                log::warn!(
                    "cannot check that transit key {}/{} is derived (derived=true): the token may not read its \
                     settings",
                    self.mount,
                    self.key
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if settings["data"]["derived"].as_bool() == Some(false) {
            return Err(KmsError::Config {
                provider: format!("vault-transit key {}/{}", self.mount, self.key),
                message: format!(
                    "the key is not derived: Vault would ignore the context that binds each volume key to its \
                     volume; create one with `bao write -f {}/keys/NAME derived=true`",
                    self.mount
                ),
            });
        }
        Ok(())
    }
}

fn context(context: &EncryptionContext) -> String {
    B64.encode(context.canonical_bytes())
}

impl KeyProvider for VaultTransitProvider {
    fn id(&self) -> ProviderId {
        ProviderId::VaultTransit {
            mount: self.mount.clone(),
            key: self.key.clone(),
        }
    }

    fn generate_data_key(&self, ctx: &EncryptionContext) -> Result<(SecretKey, WrappedKey), KmsError> {
        self.refuse_underived()?;
        let v = self.request(
            "POST",
            &format!("datakey/plaintext/{}", self.key),
            Some(json!({ "context": context(ctx), "bits": 256 })),
        )?;
        let key = self.plaintext_key(&v)?;
        Ok((
            key,
            WrappedKey::from_bytes(self.field(&v, "ciphertext")?.as_bytes().to_vec()),
        ))
    }

    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<SecretKey, KmsError> {
        let body = json!({ "ciphertext": self.ciphertext(wrapped)?, "context": context(ctx) });
        let v = self.request("POST", &format!("decrypt/{}", self.key), Some(body))?;
        self.plaintext_key(&v)
    }

    fn re_encrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let body = json!({ "ciphertext": self.ciphertext(wrapped)?, "context": context(ctx) });
        let v = self.request("POST", &format!("rewrap/{}", self.key), Some(body))?;
        Ok(WrappedKey::from_bytes(
            self.field(&v, "ciphertext")?.as_bytes().to_vec(),
        ))
    }

    fn call_count(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn key_state(&self) -> Result<KeyStatus, KmsError> {
        let v = self.request("GET", &format!("keys/{}", self.key), None)?;
        let latest = v["data"]["latest_version"].as_u64().unwrap_or(0);
        let min = v["data"]["min_decryption_version"].as_u64().unwrap_or(0);
        let derived = match v["data"]["derived"].as_bool() {
            Some(false) => "; NOT derived: the volume-id context is ignored",
            _ => "",
        };
        Ok(KeyStatus {
            decrypts_from: u32::try_from(min).ok(),
            ..KeyStatus::of(format!(
                "Enabled (version {latest}, decrypts from version {min}{derived})"
            ))
        })
    }
}
