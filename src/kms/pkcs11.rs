//! The `pkcs11` provider: the master key is a non-extractable AES key in a
//! PKCS#11 token (CloudHSM, YubiHSM, Luna, SoftHSM…). Volume keys are sealed
//! inside the token with CKM_AES_GCM: random 96-bit IV, 128-bit tag, the
//! encryption context as AAD. Blob: 0x01 || IV (12) || ciphertext || tag.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::{EncryptionContext, KeyProvider, KeyStatus, KmsError, ProviderId};
use crate::crypto::{SecretKey, WrappedKey, random_array};

const BLOB_VERSION: u8 = 1;

struct Connection {
    pid: u32,
    session: Session,
    key: ObjectHandle,
    _ctx: Pkcs11,
}

pub struct Pkcs11Provider {
    module: String,
    token: Option<String>,
    object: String,
    pin: Zeroizing<String>,
    /// Opened on first use and again after a fork (PKCS#11 state does not survive one).
    conn: Mutex<Option<Connection>>,
    calls: AtomicU64,
}

fn read_pin(query: &BTreeMap<String, String>) -> Result<Zeroizing<String>, String> {
    if let Some(v) = query.get("pin-value") {
        return Ok(Zeroizing::new(v.clone()));
    }
    match query.get("pin-source").map(String::as_str) {
        Some(src) if src.starts_with("file:") => {
            let path = src.trim_start_matches("file:").trim_start_matches("//");
            let text =
                Zeroizing::new(std::fs::read_to_string(path).map_err(|e| format!("cannot read PIN file {path}: {e}"))?);
            Ok(Zeroizing::new(text.lines().next().unwrap_or("").to_string()))
        }
        Some(src) if src.starts_with("env:") => {
            let var = &src[4..];
            std::env::var(var)
                .map(Zeroizing::new)
                .map_err(|_| format!("PIN variable {var} is not set"))
        }
        Some(other) => Err(format!("unsupported pin-source {other} (use file:PATH or env:VAR)")),
        None => std::env::var("KMSFS_PKCS11_PIN")
            .map(Zeroizing::new)
            .map_err(|_| "no PIN: pin-source=file:PATH in the URI, or KMSFS_PKCS11_PIN".to_string()),
    }
}

impl Pkcs11Provider {
    pub fn new(path: &BTreeMap<String, String>, query: &BTreeMap<String, String>) -> Result<Self, KmsError> {
        let config = |message: String| KmsError::Config {
            provider: "pkcs11".into(),
            message,
        };
        let module = query
            .get("module-path")
            .cloned()
            .or_else(|| std::env::var("KMSFS_PKCS11_MODULE").ok())
            .ok_or_else(|| {
                config(
                    "no module configured for this token: give module-path= in --kms, set KMSFS_PKCS11_MODULE, \
                     or run `kmsfs init --kms` on this host"
                        .into(),
                )
            })?;
        let object = path
            .get("object")
            .cloned()
            .ok_or_else(|| config("no object= (key label) in the URI".into()))?;
        Ok(Pkcs11Provider {
            module,
            token: path.get("token").cloned(),
            object,
            pin: read_pin(query).map_err(config)?,
            conn: Mutex::new(None),
            calls: AtomicU64::new(0),
        })
    }

    fn name(&self) -> String {
        format!(
            "pkcs11 ({}, token {})",
            self.module,
            self.token.as_deref().unwrap_or("<first>")
        )
    }

    fn unreachable(&self, cause: impl std::fmt::Display) -> KmsError {
        KmsError::Unreachable {
            provider: self.name(),
            cause: cause.to_string(),
        }
    }

    fn refused(&self, what: &str, e: impl std::fmt::Display) -> KmsError {
        KmsError::Refused {
            provider: self.name(),
            code: what.to_string(),
            message: e.to_string(),
        }
    }

    fn connect(&self) -> Result<Connection, KmsError> {
        let ctx = Pkcs11::new(&self.module).map_err(|e| self.unreachable(format!("cannot load module: {e}")))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| self.unreachable(format!("C_Initialize: {e}")))?;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| self.unreachable(format!("C_GetSlotList: {e}")))?;
        let slot = slots
            .into_iter()
            .find(|s| match &self.token {
                Some(label) => ctx
                    .get_token_info(*s)
                    .map(|i| i.label().trim_end() == label)
                    .unwrap_or(false),
                None => true,
            })
            .ok_or_else(|| self.unreachable("no token with that label"))?;
        let session = ctx
            .open_ro_session(slot)
            .map_err(|e| self.unreachable(format!("C_OpenSession: {e}")))?;
        let pin = AuthPin::new(self.pin.as_str().to_string().into());
        session
            .login(UserType::User, Some(&pin))
            .map_err(|e| self.refused("C_Login", e))?;
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(self.object.as_bytes().to_vec()),
            ])
            .map_err(|e| self.refused("C_FindObjects", e))?;
        let key = match found.as_slice() {
            [key] => *key,
            [] => {
                return Err(self.refused(
                    "key not found",
                    format!("no secret key labelled {} in the token", self.object),
                ));
            }
            _ => {
                return Err(self.refused(
                    "ambiguous key",
                    format!("several secret keys are labelled {}", self.object),
                ));
            }
        };
        if let Ok(attrs) = session.get_attributes(key, &[AttributeType::Extractable]) {
            if attrs.iter().any(|a| matches!(a, Attribute::Extractable(true))) {
                log::warn!("PKCS#11 key {} is extractable; a master key should not be", self.object);
            }
        }
        Ok(Connection {
            pid: std::process::id(),
            session,
            key,
            _ctx: ctx,
        })
    }

    fn with_session<T>(&self, f: impl FnOnce(&Session, ObjectHandle) -> Result<T, KmsError>) -> Result<T, KmsError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut conn = crate::util::lock(&self.conn);
        if conn.as_ref().is_some_and(|c| c.pid != std::process::id()) {
            // Inherited across a fork: the library's state is not ours to use or finalize.
            std::mem::forget(conn.take());
        }
        if conn.is_none() {
            *conn = Some(self.connect()?);
        }
        let c = conn.as_ref().ok_or_else(|| self.unreachable("no session"))?;
        f(&c.session, c.key)
    }

    fn seal(&self, key: &SecretKey, context: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let aad = context.canonical_bytes();
        let mut iv: [u8; 12] = random_array();
        let sealed = self.with_session(|session, handle| {
            let params = GcmParams::new(&mut iv, &aad, 128.into()).map_err(|e| self.refused("CKM_AES_GCM", e))?;
            session
                .encrypt(&Mechanism::AesGcm(params), handle, key.expose())
                .map_err(|e| self.refused("C_Encrypt", e))
        })?;
        Ok(WrappedKey::from_bytes([&[BLOB_VERSION][..], &iv, &sealed].concat()))
    }
}

impl KeyProvider for Pkcs11Provider {
    fn id(&self) -> ProviderId {
        ProviderId::Pkcs11 {
            token: self.token.clone(),
            object: self.object.clone(),
        }
    }

    fn generate_data_key(&self, context: &EncryptionContext) -> Result<(SecretKey, WrappedKey), KmsError> {
        let key = SecretKey::random();
        let wrapped = self.seal(&key, context)?;
        Ok((key, wrapped))
    }

    fn decrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<SecretKey, KmsError> {
        let blob = wrapped.as_bytes();
        if blob.len() != 1 + 12 + 32 + 16 || blob[0] != BLOB_VERSION {
            return Err(KmsError::InvalidCiphertext(self.object.clone()));
        }
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&blob[1..13]);
        let aad = context.canonical_bytes();
        let plain = self.with_session(|session, handle| {
            let params = GcmParams::new(&mut iv, &aad, 128.into()).map_err(|e| self.refused("CKM_AES_GCM", e))?;
            session
                .decrypt(&Mechanism::AesGcm(params), handle, &blob[13..])
                .map(Zeroizing::new)
                .map_err(|_| KmsError::InvalidCiphertext(self.object.clone()))
        })?;
        SecretKey::from_slice(&plain).ok_or_else(|| KmsError::InvalidCiphertext(self.object.clone()))
    }

    fn re_encrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let key = self.decrypt(wrapped, context)?;
        self.seal(&key, context)
    }

    fn call_count(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn key_state(&self) -> Result<KeyStatus, KmsError> {
        self.with_session(|_, _| Ok(KeyStatus::of("Enabled (found in the token)")))
    }
}
