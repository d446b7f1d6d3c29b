use super::*;

const LEN: u64 = 64 * PAGE_SIZE as u64;

#[test]
fn anonymous_conformance() {
    conformance::run_suite(Arc::new(MmapRegion::anonymous("anon", LEN).unwrap()), LEN);
}

#[test]
fn memfd_conformance() {
    conformance::run_suite(Arc::new(MmapRegion::memfd("memfd", LEN).unwrap()), LEN);
}

#[test]
fn created_file_conformance_and_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let r = Arc::new(MmapRegion::create_file("file", &path, LEN).unwrap());
    conformance::run_suite(r.clone(), LEN);
    r.sync().unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len() as u64, LEN);
    assert_eq!((on_disk[0], on_disk[LEN as usize - 1]), (0x11, 0x22), "writes reach the file");
    // Reopening maps the same bytes, not fresh.
    let again = MmapRegion::open_file("file", &path).unwrap();
    assert!(!again.is_fresh_zeroed());
    assert_eq!(unsafe { *again.host_ptr() }, 0x11);
}

#[test]
fn foreign_mapping_conformance() {
    let owner = MmapRegion::anonymous("owner", LEN).unwrap();
    let r = unsafe { MmapRegion::from_raw("foreign", owner.host_ptr(), LEN, true).unwrap() };
    conformance::run_suite(Arc::new(r), LEN);
    // The wrapper did not unmap the owner's memory when dropped.
    assert_eq!(unsafe { *owner.host_ptr() }, 0x11);
}

#[test]
fn bad_lengths_and_files_are_clear_errors() {
    assert!(matches!(MmapRegion::anonymous("x", 0), Err(MemoryError::BadLength { .. })));
    assert!(matches!(MmapRegion::memfd("x", 4097), Err(MemoryError::BadLength { .. })));
    let e = MmapRegion::open_file("img", std::path::Path::new("/nonexistent/img")).err().unwrap();
    assert!(e.to_string().contains("open 'img'"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd");
    std::fs::write(&odd, [1u8; 5000]).unwrap();
    assert!(MmapRegion::open_file("odd", &odd).err().unwrap().to_string().contains("multiple of the page size"));
}
