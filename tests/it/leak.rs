//! No plaintext touches the backing directory: marker strings written as
//! names, contents, xattrs and symlink targets appear nowhere in it, the
//! metadata DB and its WAL included.

use std::fs;

use crate::common::{TestVolume, all_backing_bytes, xattr_set};

const MARKER: &str = "MARKERplaintextLEAK";

fn assert_no_marker(vol: &TestVolume, when: &str) {
    let needles: Vec<Vec<u8>> = vec![
        MARKER.as_bytes().to_vec(),
        MARKER.to_lowercase().into_bytes(),
        // UTF-16 or reversed copies would be just as bad
        MARKER.bytes().rev().collect(),
    ];
    for (path, bytes) in all_backing_bytes(&vol.backing) {
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{when}: plaintext marker found in {}",
                path.display()
            );
        }
    }
}

#[test]
fn markers_never_reach_the_backing_directory() {
    let vol = TestVolume::init();
    let mount = vol.mount();
    let dir = vol.path(&format!("{MARKER}-dir"));
    fs::create_dir(&dir).unwrap();
    let file = dir.join(format!("{MARKER}-file"));
    let content = format!("{MARKER} in the content ").repeat(2000);
    fs::write(&file, &content).unwrap();
    fs::write(vol.path(&format!("{MARKER}{}", "x".repeat(230))), MARKER).unwrap(); // long name with sidecar
    std::os::unix::fs::symlink(format!("/{MARKER}/target"), vol.path("link")).unwrap();
    xattr_set(&file, &format!("user.{MARKER}"), MARKER.as_bytes(), 0).unwrap();
    xattr_set(&dir, "user.note", format!("{MARKER} on a directory").as_bytes(), 0).unwrap();
    fs::write(vol.path(&MARKER.to_lowercase()), MARKER.to_lowercase()).unwrap();
    // Still mounted: keys may be in the WAL, data in the page cache of the backing fs.
    assert_no_marker(&vol, "while mounted");
    mount.unmount();
    assert_no_marker(&vol, "after unmount");
    let _m = vol.mount();
    assert_eq!(fs::read_to_string(&file).unwrap(), content);
}
