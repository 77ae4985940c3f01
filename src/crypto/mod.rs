//! The crypto core: keys, the AEAD wrapper, block sealing and name encryption.
//! Knows nothing about files, FUSE or the metadata DB.

mod aead;
mod block;
mod derived;
mod keys;
mod names;

pub use aead::{AuthError, NONCE_LEN, SEAL_OVERHEAD, Sealer, TAG_LEN};
pub use block::{BLOCK_OVERHEAD, BLOCK_SIZE, BlockCipher, CIPHER_BLOCK_SIZE, FILE_ID_LEN, FileId, Layout, sealed_len};
pub use derived::DerivedKeys;
pub use keys::{KEY_LEN, SecretKey, WrappedKey, random_array};
pub use names::{DIR_IV_LEN, NameCipher, NameError};
