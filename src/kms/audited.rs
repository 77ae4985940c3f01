//! Every provider behind one decorator that writes each call and its
//! outcome to the audit log, so that no provider can be used unrecorded.

use std::path::Path;
use std::sync::Arc;

use super::{EncryptionContext, KeyProvider, KeyStatus, KmsError, ProviderId};
use crate::audit::{self, Event};
use crate::crypto::{SecretKey, WrappedKey};

pub struct Audited {
    inner: Arc<dyn KeyProvider>,
}

/// `inner`, with every call it makes recorded in the process's audit log.
pub fn audited(inner: Arc<dyn KeyProvider>) -> Arc<dyn KeyProvider> {
    Arc::new(Audited { inner })
}

/// An audit event naming `id`'s provider and key.
pub fn key_event(action: &str, id: &ProviderId) -> Event {
    let whole = id.to_string();
    let key = whole.split_once(':').map_or(whole.as_str(), |(_, key)| key);
    Event::new(action).provider(id.kind(), key)
}

impl Audited {
    fn event(&self, action: &str, context: &EncryptionContext, blob: Option<&WrappedKey>) -> Event {
        let id = self.inner.id();
        let version = blob.and_then(|b| id.wrapping_version(b));
        key_event(action, &id).key_version(version).context(context.pairs())
    }
}

impl KeyProvider for Audited {
    fn id(&self) -> ProviderId {
        self.inner.id()
    }

    fn before_fork(&self) {
        self.inner.before_fork();
    }

    fn generate_data_key(&self, context: &EncryptionContext) -> Result<(SecretKey, WrappedKey), KmsError> {
        let result = self.inner.generate_data_key(context);
        let blob = result.as_ref().ok().map(|(_, blob)| blob);
        audit::record(self.event("GenerateDataKey", context, blob).outcome(&result));
        result
    }

    fn decrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<SecretKey, KmsError> {
        let result = self.inner.decrypt(wrapped, context);
        audit::record(self.event("Decrypt", context, Some(wrapped)).outcome(&result));
        result
    }

    fn re_encrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let result = self.inner.re_encrypt(wrapped, context);
        let id = self.inner.id();
        let event = self
            .event("ReEncrypt", context, result.as_ref().ok())
            .details(serde_json::json!({ "from_version": id.wrapping_version(wrapped) }));
        audit::record(event.outcome(&result));
        result
    }

    fn call_count(&self) -> u64 {
        self.inner.call_count()
    }

    fn key_state(&self) -> Result<KeyStatus, KmsError> {
        let result = self.inner.key_state();
        let event = key_event("DescribeKey", &self.inner.id());
        let event = match &result {
            Ok(status) => event.details(serde_json::json!({ "state": status.state })),
            Err(_) => event,
        };
        audit::record(event.outcome(&result));
        result
    }

    fn is_behind(&self, wrapped: &WrappedKey) -> bool {
        self.inner.is_behind(wrapped)
    }

    fn note_volume(&self, volume_id: &[u8; 16], backing: &Path, blobs: &[WrappedKey]) {
        self.inner.note_volume(volume_id, backing, blobs)
    }
}
