//! POSIX ACLs in the form the kernel passes them as `system.posix_acl_access`
//! and `system.posix_acl_default`: a little-endian u32 version (2), then
//! 8-byte entries of tag (u16), permissions (u16) and id (u32).
//!
//! With FUSE_POSIX_ACL the kernel enforces ACLs and caches them; it leaves
//! to the filesystem what a disk filesystem does in `posix_acl_*`: keeping
//! the mode bits in step with an access ACL (both ways), and giving new
//! files their directory's default ACL. These are those rules, as the
//! kernel's fs/posix_acl.c applies them.

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const ENTRY_LEN: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A valid ACL: one owner, owning-group and other entry each, a mask
/// whenever there are named users or groups, at most 32 entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// Parses and checks an ACL; `None` if it is not one (EINVAL).
    pub fn parse(value: &[u8]) -> Option<Acl> {
        let (version, body) = value.split_first_chunk::<4>()?;
        if u32::from_le_bytes(*version) != VERSION || body.len() % ENTRY_LEN != 0 || body.len() / ENTRY_LEN > 32 {
            return None;
        }
        let entries: Vec<Entry> = body
            .chunks_exact(ENTRY_LEN)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect();
        let count = |tag| entries.iter().filter(|e| e.tag == tag).count();
        let known = entries
            .iter()
            .all(|e| e.perm <= 7 && [USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&e.tag));
        let named = count(USER) + count(GROUP);
        let shape_ok = count(USER_OBJ) == 1
            && count(GROUP_OBJ) == 1
            && count(OTHER) == 1
            && count(MASK) <= 1
            && (named == 0 || count(MASK) == 1);
        let mut ids: Vec<(u16, u32)> = entries
            .iter()
            .filter(|e| e.tag == USER || e.tag == GROUP)
            .map(|e| (e.tag, e.id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        (known && shape_ok && ids.len() == named).then_some(Acl { entries })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// Says no more than the mode bits do: such an ACL is not stored.
    pub fn is_minimal(&self) -> bool {
        self.entries
            .iter()
            .all(|e| [USER_OBJ, GROUP_OBJ, OTHER].contains(&e.tag))
    }

    fn perm(&self, tag: u16) -> u32 {
        self.entries
            .iter()
            .find(|e| e.tag == tag)
            .map_or(0, |e| u32::from(e.perm))
    }

    /// The permission bits that mirror the ACL: the group bits show the
    /// mask where there is one (posix_acl_equiv_mode).
    pub fn mode(&self) -> u32 {
        let group = if self.entries.iter().any(|e| e.tag == MASK) {
            self.perm(MASK)
        } else {
            self.perm(GROUP_OBJ)
        };
        self.perm(USER_OBJ) << 6 | group << 3 | self.perm(OTHER)
    }

    /// Permission bits that give no more than the ACL, for a node that
    /// cannot keep one (a fifo, socket or device node): the owning group
    /// gets what both its entry and the mask allow; named entries are lost.
    pub fn narrowest_mode(&self) -> u32 {
        let group = if self.entries.iter().any(|e| e.tag == MASK) {
            self.perm(MASK) & self.perm(GROUP_OBJ)
        } else {
            self.perm(GROUP_OBJ)
        };
        self.perm(USER_OBJ) << 6 | group << 3 | self.perm(OTHER)
    }

    /// What chmod does to an access ACL: the owner, other and mask (else
    /// owning-group) entries take the new bits (posix_acl_chmod).
    pub fn chmod(&mut self, mode: u32) {
        let has_mask = self.entries.iter().any(|e| e.tag == MASK);
        for e in &mut self.entries {
            let bits = match e.tag {
                USER_OBJ => mode >> 6,
                MASK => mode >> 3,
                GROUP_OBJ if !has_mask => mode >> 3,
                OTHER => mode,
                _ => continue,
            };
            e.perm = (bits & 7) as u16;
        }
    }

    /// A new node's access ACL and permission bits from its directory's
    /// default ACL and the mode it was created with (which the umask does
    /// not touch then): each of the owner, other and mask (else
    /// owning-group) entries keeps only what both allow
    /// (posix_acl_create_masq).
    pub fn inherit(&self, mode: u32) -> (Acl, u32) {
        let mut acl = self.clone();
        let has_mask = acl.entries.iter().any(|e| e.tag == MASK);
        for e in &mut acl.entries {
            let shift = match e.tag {
                USER_OBJ => 6,
                MASK => 3,
                GROUP_OBJ if !has_mask => 3,
                OTHER => 0,
                _ => continue,
            };
            e.perm &= ((mode >> shift) & 7) as u16;
        }
        let mode = (mode & !0o777) | acl.mode();
        (acl, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        Acl {
            entries: entries.iter().map(|&(tag, perm, id)| Entry { tag, perm, id }).collect(),
        }
        .to_bytes()
    }

    const NONE: u32 = u32::MAX;

    #[test]
    fn parses_what_setfacl_sends_and_refuses_malformed_acls() {
        let named = acl(&[
            (USER_OBJ, 6, NONE),
            (USER, 4, 1000),
            (GROUP_OBJ, 4, NONE),
            (MASK, 6, NONE),
            (OTHER, 0, NONE),
        ]);
        let parsed = Acl::parse(&named).unwrap();
        assert_eq!(parsed.to_bytes(), named);
        assert!(!parsed.is_minimal());
        assert_eq!(parsed.mode(), 0o660, "group bits show the mask");

        let minimal = acl(&[(USER_OBJ, 7, NONE), (GROUP_OBJ, 5, NONE), (OTHER, 1, NONE)]);
        let parsed = Acl::parse(&minimal).unwrap();
        assert!(parsed.is_minimal());
        assert_eq!(parsed.mode(), 0o751);

        for bad in [
            Vec::new(),
            named[..named.len() - 1].to_vec(),
            [3u32.to_le_bytes().as_slice(), &named[4..]].concat(),
            // A named user without a mask.
            acl(&[
                (USER_OBJ, 6, NONE),
                (USER, 4, 1000),
                (GROUP_OBJ, 4, NONE),
                (OTHER, 0, NONE),
            ]),
            // No owner entry; two other entries; a bad tag; permissions above rwx.
            acl(&[(GROUP_OBJ, 4, NONE), (OTHER, 0, NONE)]),
            acl(&[
                (USER_OBJ, 6, NONE),
                (GROUP_OBJ, 4, NONE),
                (OTHER, 0, NONE),
                (OTHER, 0, NONE),
            ]),
            acl(&[
                (USER_OBJ, 6, NONE),
                (GROUP_OBJ, 4, NONE),
                (OTHER, 0, NONE),
                (0x40, 0, NONE),
            ]),
            acl(&[(USER_OBJ, 8, NONE), (GROUP_OBJ, 4, NONE), (OTHER, 0, NONE)]),
            // The same user named twice.
            acl(&[
                (USER_OBJ, 6, NONE),
                (USER, 4, 1000),
                (USER, 6, 1000),
                (GROUP_OBJ, 4, NONE),
                (MASK, 6, NONE),
                (OTHER, 0, NONE),
            ]),
        ] {
            assert!(Acl::parse(&bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn chmod_moves_the_mask_not_the_owning_group() {
        let mut a = Acl::parse(&acl(&[
            (USER_OBJ, 7, NONE),
            (GROUP, 7, 50),
            (GROUP_OBJ, 5, NONE),
            (MASK, 7, NONE),
            (OTHER, 5, NONE),
        ]))
        .unwrap();
        a.chmod(0o640);
        assert_eq!(a.perm(USER_OBJ), 6);
        assert_eq!(a.perm(MASK), 4);
        assert_eq!(a.perm(GROUP_OBJ), 5, "the owning group keeps its entry");
        assert_eq!(a.perm(OTHER), 0);
        assert_eq!(a.mode(), 0o640);

        let mut plain = Acl::parse(&acl(&[(USER_OBJ, 7, NONE), (GROUP_OBJ, 7, NONE), (OTHER, 7, NONE)])).unwrap();
        plain.chmod(0o751);
        assert_eq!(plain.mode(), 0o751);
    }

    #[test]
    fn inheriting_masks_the_default_acl_with_the_creation_mode() {
        let default = Acl::parse(&acl(&[
            (USER_OBJ, 7, NONE),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, NONE),
            (MASK, 7, NONE),
            (OTHER, 5, NONE),
        ]))
        .unwrap();
        // open(O_CREAT, 0666): no execute bits come through.
        let (access, mode) = default.inherit(libc::S_IFREG | 0o666);
        assert_eq!(mode, libc::S_IFREG | 0o664);
        assert_eq!(access.perm(USER), 7, "named entries stay; the mask limits them");
        assert_eq!(access.perm(MASK), 6);
        assert_eq!(access.perm(GROUP_OBJ), 5);
        assert_eq!(access.narrowest_mode(), 0o644, "owning group: its entry and the mask");
        // mkdir(0755) keeps set-group-ID and the rest of the mode.
        let (_, mode) = default.inherit(libc::S_IFDIR | libc::S_ISGID | 0o755);
        assert_eq!(mode, libc::S_IFDIR | libc::S_ISGID | 0o755);
    }
}
