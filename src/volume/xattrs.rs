//! Extended attributes as the backing inode keeps them: names sealed
//! deterministically under the xattr-names key, values sealed under the
//! xattr-values key and bound to their owner (file id or directory IV) and
//! name (FORMAT.md, "Extended attributes").

use super::Volume;
use crate::crypto::DIR_IV_LEN;

pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
const USER_PREFIX: &[u8] = b"user.";
const BACKING_PREFIX: &str = "user.kmsfs.";

/// An xattr name as it is sealed: the part after `user.` of a user xattr,
/// or a POSIX ACL's whole name after a NUL byte, which no user xattr name
/// can hold, so that an edited backing directory cannot pass a user's
/// xattr off as an ACL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredName(Vec<u8>);

impl StoredName {
    /// How a name the kernel passes is kept; `None` for a namespace kmsfs
    /// does not keep (ACLs only when `acls`).
    pub fn of(name: &[u8], acls: bool) -> Option<StoredName> {
        if let Some(rest) = name
            .strip_prefix(USER_PREFIX)
            .filter(|r| !r.is_empty() && !r.contains(&0))
        {
            return Some(StoredName(rest.to_vec()));
        }
        (acls && (name == ACL_ACCESS || name == ACL_DEFAULT)).then(|| StoredName([b"\0", name].concat()))
    }

    /// The name users see.
    pub fn full_name(&self) -> Vec<u8> {
        match self.0.strip_prefix(b"\0") {
            Some(acl) => acl.to_vec(),
            None => [USER_PREFIX, &self.0].concat(),
        }
    }

    /// The name as it is sealed (and bound into the value's associated data).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_acl(&self) -> bool {
        self.0.starts_with(b"\0")
    }

    fn acl(name: &[u8]) -> StoredName {
        StoredName([b"\0", name].concat())
    }
}

fn aad(owner: &[u8; 16], name: &StoredName) -> Vec<u8> {
    [b"kmsfs-xattr-v1\0".as_slice(), owner, &name.0].concat()
}

impl Volume {
    pub fn xattr_backing_name(&self, name: &StoredName) -> String {
        format!(
            "{BACKING_PREFIX}{}",
            self.xattr_names.encrypt(&[0u8; DIR_IV_LEN], &name.0)
        )
    }

    /// The stored name behind a backing xattr name; `None` for one kmsfs
    /// did not write (or that an edit damaged).
    pub fn xattr_stored_name(&self, backing: &[u8]) -> Option<StoredName> {
        let encrypted = backing.strip_prefix(BACKING_PREFIX.as_bytes())?;
        if let Ok(user) = self.xattr_names.decrypt(&[0u8; DIR_IV_LEN], encrypted) {
            return Some(StoredName(user));
        }
        // Name decryption refuses NUL bytes: the two ACL names are recognised whole.
        [ACL_ACCESS, ACL_DEFAULT]
            .into_iter()
            .map(StoredName::acl)
            .find(|acl| self.xattr_backing_name(acl).as_bytes() == backing)
    }

    pub fn seal_xattr(&self, owner: &[u8; 16], name: &StoredName, value: &[u8]) -> Vec<u8> {
        self.xattr_values.seal(&aad(owner, name), value)
    }

    /// As `seal_xattr`, with a given nonce (a reverse view's derived one).
    pub fn seal_xattr_with_nonce(&self, owner: &[u8; 16], name: &StoredName, value: &[u8], nonce: [u8; 12]) -> Vec<u8> {
        let mut out = vec![0u8; value.len() + crate::crypto::SEAL_OVERHEAD];
        self.xattr_values.seal_into(nonce, &aad(owner, name), value, &mut out);
        out
    }

    pub fn open_xattr(&self, owner: &[u8; 16], name: &StoredName, sealed: &[u8]) -> Option<Vec<u8>> {
        self.xattr_values
            .open(&aad(owner, name), sealed)
            .ok()
            .map(|v| v.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_and_acl_names_never_meet() {
        let user = StoredName::of(b"user.system.posix_acl_access", true).unwrap();
        let acl = StoredName::of(ACL_ACCESS, true).unwrap();
        assert_ne!(user, acl);
        assert_eq!(user.full_name(), b"user.system.posix_acl_access");
        assert_eq!(acl.full_name(), ACL_ACCESS);
        assert!(StoredName::of(ACL_ACCESS, false).is_none(), "ACLs off: not kept");
        assert!(StoredName::of(b"user.", true).is_none());
        assert!(StoredName::of(b"trusted.x", true).is_none());
        assert!(StoredName::of(b"security.capability", true).is_none());
    }
}
