//! kmsfs: a transparent encrypted filesystem with KMS-style envelope keys.
//!
//! Layers, each knowing nothing of the ones above it:
//! - [`crypto`]: keys, AES-256-GCM-SIV blocks, name encryption;
//! - [`kms`]: key providers holding the master key;
//! - [`volume`]: the backing directory, headers, blocks and the metadata DB;
//! - [`fs`]: the FUSE adapter;
//! - [`util`]: hex, the clock and poison-tolerant locks, for all of them.

pub mod audit;
pub mod crypto;
pub mod fs;
pub mod kms;
pub mod reverse;
pub mod test_hooks;
pub mod util;
pub mod volume;
