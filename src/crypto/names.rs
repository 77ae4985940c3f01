//! File name encryption: deterministic AES-256-GCM-SIV per directory (the
//! directory's random IV is the nonce and part of the associated data), with
//! names padded to 16 bytes and encoded as unpadded base64url.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::aead::{NONCE_LEN, Sealer};
use super::keys::SecretKey;

pub const DIR_IV_LEN: usize = 16;
const PAD_TO: usize = 16;
const NAME_AAD_PREFIX: &[u8] = b"kmsfs-name-v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("not a base64url-encoded name")]
    Encoding,
    #[error("name does not authenticate in this directory")]
    Auth,
    #[error("bad padding in decrypted name")]
    Padding,
    #[error("symlink target does not authenticate under this volume's key")]
    LinkAuth,
    #[error("its long target is not in the metadata DB (its row is missing, or the DB cannot be read)")]
    MissingLinkTarget,
}

pub struct NameCipher {
    sealer: Sealer,
}

fn aad(dir_iv: &[u8; DIR_IV_LEN]) -> Vec<u8> {
    [NAME_AAD_PREFIX, dir_iv.as_slice()].concat()
}

fn nonce(dir_iv: &[u8; DIR_IV_LEN]) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(&dir_iv[..NONCE_LEN]);
    n
}

impl NameCipher {
    pub fn new(key: &SecretKey) -> Self {
        NameCipher {
            sealer: Sealer::new(key),
        }
    }

    pub fn encrypt(&self, dir_iv: &[u8; DIR_IV_LEN], name: &[u8]) -> String {
        let pad = PAD_TO - name.len() % PAD_TO;
        let mut padded = Vec::with_capacity(name.len() + pad);
        padded.extend_from_slice(name);
        padded.resize(name.len() + pad, pad as u8);
        let mut sealed = vec![0u8; padded.len() + super::SEAL_OVERHEAD];
        self.sealer.seal_into(nonce(dir_iv), &aad(dir_iv), &padded, &mut sealed);
        // The nonce is the directory IV: not stored in every name.
        URL_SAFE_NO_PAD.encode(&sealed[NONCE_LEN..])
    }

    pub fn decrypt(&self, dir_iv: &[u8; DIR_IV_LEN], encoded: &[u8]) -> Result<Vec<u8>, NameError> {
        let body = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| NameError::Encoding)?;
        let sealed = [nonce(dir_iv).as_slice(), &body].concat();
        let padded = self.sealer.open(&aad(dir_iv), &sealed).map_err(|_| NameError::Auth)?;
        let pad = *padded.last().ok_or(NameError::Padding)? as usize;
        if pad == 0
            || pad > PAD_TO
            || pad > padded.len()
            || padded[padded.len() - pad..].iter().any(|&b| b as usize != pad)
        {
            return Err(NameError::Padding);
        }
        let name = padded[..padded.len() - pad].to_vec();
        if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
            return Err(NameError::Padding);
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_bound_to_directory() {
        let c = NameCipher::new(&SecretKey::from_slice(&[3u8; 32]).unwrap());
        let iv1 = [1u8; DIR_IV_LEN];
        let iv2 = [2u8; DIR_IV_LEN];
        for name in [&b"a"[..], b"exactly sixteen!", "üñí cödé .txt".as_bytes(), &[b'x'; 255]] {
            let enc = c.encrypt(&iv1, name);
            assert_eq!(c.encrypt(&iv1, name), enc, "deterministic");
            assert!(!enc.contains('.') && !enc.contains('/'));
            assert_eq!(c.decrypt(&iv1, enc.as_bytes()).unwrap(), name);
            assert_eq!(c.decrypt(&iv2, enc.as_bytes()), Err(NameError::Auth));
        }
        assert_eq!(c.decrypt(&iv1, b"not*base64"), Err(NameError::Encoding));
    }
}
