//! The `aws-kms` provider: AWS KMS's JSON protocol over HTTPS, signed with
//! SigV4 (`aws-sigv4`), with retries on throttling and server errors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::aws_credentials::{self, AwsCredentials};
use super::http::{Client, check_transport};
use super::{EncryptionContext, KeyProvider, KeyStatus, KmsError, ProviderId};
use crate::crypto::{SecretKey, WrappedKey};

/// Error types worth retrying (AWS's own SDKs retry these).
const RETRYABLE: &[&str] = &[
    "ThrottlingException",
    "KMSInternalException",
    "LimitExceededException",
    "ServiceUnavailableException",
];

pub struct AwsKmsProvider {
    key: String,
    region: String,
    endpoint: String,
    profile: Option<String>,
    client: Client,
    calls: AtomicU64,
}

/// Signs a request with SigV4 and returns the headers to add to it.
pub fn sigv4_headers(
    credentials: &AwsCredentials,
    region: &str,
    service: &str,
    time: SystemTime,
    (method, url, headers, body): (&str, &str, &[(&str, &str)], &[u8]),
) -> Result<Vec<(String, String)>, String> {
    let identity = Credentials::new(
        credentials.access_key_id.clone(),
        credentials.secret_access_key.as_str().to_string(),
        credentials.session_token.as_ref().map(|t| t.as_str().to_string()),
        None,
        "kmsfs",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let request = SignableRequest::new(method, url, headers.iter().copied(), SignableBody::Bytes(body))
        .map_err(|e| e.to_string())?;
    let (instructions, _signature) = sign(request, &params).map_err(|e| e.to_string())?.into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn context_json(context: &EncryptionContext) -> Value {
    let map: serde_json::Map<String, Value> = context
        .pairs()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    Value::Object(map)
}

impl AwsKmsProvider {
    pub fn new(key: &str, query: &BTreeMap<String, String>) -> Result<Self, KmsError> {
        let profile = query.get("profile").cloned();
        let region = aws_credentials::region(query.get("region").map(String::as_str), profile.as_deref())?;
        let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let endpoint = query
            .get("endpoint")
            .cloned()
            .or_else(|| env("AWS_ENDPOINT_URL_KMS"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("https://kms.{region}.amazonaws.com"));
        check_transport("aws-kms", &endpoint)?;
        Ok(AwsKmsProvider {
            key: key.to_string(),
            region,
            endpoint: endpoint.trim_end_matches('/').to_string() + "/",
            profile,
            client: Client::new(
                "aws-kms",
                query.get("ca_cert").map(String::as_str),
                query.get("timeout").map(String::as_str),
            )?,
            calls: AtomicU64::new(0),
        })
    }

    fn unreachable(&self, cause: impl std::fmt::Display) -> KmsError {
        KmsError::Unreachable {
            provider: format!("aws-kms ({})", self.endpoint),
            cause: cause.to_string(),
        }
    }

    /// One KMS API call, retried on throttling, 5xx and transport errors.
    fn call(&self, operation: &str, body: Value) -> Result<Value, KmsError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let body = Zeroizing::new(serde_json::to_vec(&body).map_err(|e| self.unreachable(e))?);
        let target = format!("TrentService.{operation}");
        let mut send = || {
            let credentials = aws_credentials::credentials(self.profile.as_deref())?;
            let headers = [
                ("content-type", "application/x-amz-json-1.1"),
                ("x-amz-target", target.as_str()),
            ];
            let signed = sigv4_headers(
                &credentials,
                &self.region,
                "kms",
                SystemTime::now(),
                ("POST", &self.endpoint, &headers, &body),
            )
            .map_err(|e| KmsError::Config {
                provider: "aws-kms".into(),
                message: format!("SigV4 signing: {e}"),
            })?;
            let mut request = self.client.agent.post(&self.endpoint);
            for (k, v) in headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain(signed)
            {
                request = request.header(k, v);
            }
            Ok(request.send(&body[..]))
        };
        let refusal = |status: u16, err: &Value| {
            let code = err["__type"]
                .as_str()
                .unwrap_or("")
                .rsplit('#')
                .next()
                .unwrap_or("")
                .to_string();
            let mut message = err["message"]
                .as_str()
                .or(err["Message"].as_str())
                .unwrap_or("")
                .to_string();
            if code == "NotFoundException" {
                // A key id names a key in one region only.
                message.push_str(&format!(
                    " (looked for in region {}: `region=` in the URI, AWS_REGION or the profile's region \
                     name another)",
                    self.region
                ));
            }
            let retry = status >= 500 || RETRYABLE.contains(&code.as_str());
            let code = if code.is_empty() {
                format!("HTTP {status}")
            } else {
                code
            };
            (
                KmsError::Refused {
                    provider: format!("aws-kms key {}", self.key),
                    code,
                    message,
                },
                retry,
            )
        };
        self.client.call(&|cause| self.unreachable(cause), &mut send, &refusal)
    }

    fn blob_of(&self, v: &Value, field: &str) -> Result<Vec<u8>, KmsError> {
        let text = v[field]
            .as_str()
            .ok_or_else(|| self.unreachable(format!("answer lacks {field}")))?;
        B64.decode(text)
            .map_err(|_| self.unreachable(format!("{field} is not base64")))
    }

    fn plaintext_key(&self, v: &Value) -> Result<SecretKey, KmsError> {
        let plain = Zeroizing::new(self.blob_of(v, "Plaintext")?);
        SecretKey::from_slice(&plain).ok_or_else(|| self.unreachable("the data key is not 32 bytes"))
    }

    /// DescribeKey: the key's state as AWS reports it (Enabled, Disabled, PendingDeletion…).
    pub fn key_state(&self) -> Result<KeyStatus, KmsError> {
        let v = self.call("DescribeKey", json!({ "KeyId": self.key }))?;
        let meta = &v["KeyMetadata"];
        let date = |field: &str| meta[field].as_f64().filter(|t| *t >= 0.0).map(|t| t as u64);
        Ok(KeyStatus {
            state: meta["KeyState"].as_str().unwrap_or("Unknown").to_string(),
            deletion_date: date("DeletionDate"),
            material_valid_to: date("ValidTo"),
            ..KeyStatus::default()
        })
    }
}

impl KeyProvider for AwsKmsProvider {
    fn id(&self) -> ProviderId {
        ProviderId::AwsKms { key: self.key.clone() }
    }

    fn generate_data_key(&self, context: &EncryptionContext) -> Result<(SecretKey, WrappedKey), KmsError> {
        let v = self.call(
            "GenerateDataKey",
            json!({ "KeyId": self.key, "KeySpec": "AES_256", "EncryptionContext": context_json(context) }),
        )?;
        Ok((
            self.plaintext_key(&v)?,
            WrappedKey::from_bytes(self.blob_of(&v, "CiphertextBlob")?),
        ))
    }

    fn decrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<SecretKey, KmsError> {
        let v = self.call(
            "Decrypt",
            json!({
                "KeyId": self.key,
                "CiphertextBlob": B64.encode(wrapped.as_bytes()),
                "EncryptionContext": context_json(context),
            }),
        )?;
        self.plaintext_key(&v)
    }

    fn re_encrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let v = self.call(
            "ReEncrypt",
            json!({
                "CiphertextBlob": B64.encode(wrapped.as_bytes()),
                "SourceEncryptionContext": context_json(context),
                "SourceKeyId": self.key,
                "DestinationKeyId": self.key,
                "DestinationEncryptionContext": context_json(context),
            }),
        )?;
        Ok(WrappedKey::from_bytes(self.blob_of(&v, "CiphertextBlob")?))
    }

    fn call_count(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn key_state(&self) -> Result<KeyStatus, KmsError> {
        AwsKmsProvider::key_state(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `get-vanilla` case of AWS's SigV4 test suite, with its fixed clock.
    #[test]
    fn sigv4_matches_the_published_test_vector() {
        let creds = AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Zeroizing::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            session_token: None,
            source: "test".into(),
        };
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160); // 2015-08-30T12:36:00Z
        let headers = sigv4_headers(
            &creds,
            "us-east-1",
            "service",
            time,
            ("GET", "https://example.amazonaws.com/", &[], b""),
        )
        .unwrap();
        let auth = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .unwrap();
        assert_eq!(
            auth.1,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        let date = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-amz-date"))
            .unwrap();
        assert_eq!(date.1, "20150830T123600Z");
    }
}
