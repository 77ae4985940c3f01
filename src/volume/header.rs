//! The file header: the first 18 bytes of every non-empty backing file.

use crate::crypto::{FILE_ID_LEN, FileId};

pub const HEADER_LEN: usize = 2 + FILE_ID_LEN;
pub const HEADER_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header is {0} bytes long, expected {HEADER_LEN}")]
    Truncated(usize),
    #[error("unsupported header version {0}")]
    Version(u16),
    #[error("file id is all zeros")]
    ZeroId,
}

pub fn encode(file_id: &FileId) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..2].copy_from_slice(&HEADER_VERSION.to_be_bytes());
    out[2..].copy_from_slice(file_id);
    out
}

pub fn decode(bytes: &[u8]) -> Result<FileId, HeaderError> {
    if bytes.len() < HEADER_LEN {
        return Err(HeaderError::Truncated(bytes.len()));
    }
    let version = u16::from_be_bytes([bytes[0], bytes[1]]);
    if version != HEADER_VERSION {
        return Err(HeaderError::Version(version));
    }
    let mut id = [0u8; FILE_ID_LEN];
    id.copy_from_slice(&bytes[2..HEADER_LEN]);
    // An all-zero header is what a crash leaves in a preallocated file; never a valid id.
    if id == [0u8; FILE_ID_LEN] {
        return Err(HeaderError::ZeroId);
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects_damage() {
        let id = [9u8; FILE_ID_LEN];
        let h = encode(&id);
        assert_eq!(decode(&h), Ok(id));
        assert_eq!(decode(&h[..5]), Err(HeaderError::Truncated(5)));
        let mut bad = h;
        bad[1] = 7;
        assert_eq!(decode(&bad), Err(HeaderError::Version(7)));
        assert_eq!(
            decode(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(HeaderError::ZeroId)
        );
    }
}
