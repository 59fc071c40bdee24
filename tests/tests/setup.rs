//! `scripts/setup` checks what the build really needs: bindgen loads the
//! unversioned `libclang.so` (from libclang-dev), which `clang` alone does
//! not install (it brings `libclang.so.1` and `libclang-cpp.so.N`).

use std::path::PathBuf;
use std::process::Command;

fn setup() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup")
}

fn check(libdirs: Option<&str>) -> (i32, String) {
    let mut c = Command::new("bash");
    c.arg(setup()).arg("--check").env_remove("LIBCLANG_PATH");
    if let Some(d) = libdirs {
        c.env("FERRY_SETUP_LIBDIRS", d);
    }
    let out = c.output().expect("run scripts/setup --check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// On this machine (CI ran the setup before the tests) nothing is missing.
#[test]
fn this_machine_has_what_the_build_needs() {
    let (code, err) = check(None);
    assert_eq!(code, 0, "scripts/setup --check: {err}");
}

/// Only versioned libraries, as `clang` installs them: libclang-dev is missing.
#[test]
fn versioned_libclang_alone_is_not_enough() {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["libclang.so.1", "libclang-cpp.so.14", "libclang-14.so.1"] {
        std::fs::write(dir.path().join(f), b"").expect("touch");
    }
    let (code, err) = check(Some(dir.path().to_str().expect("utf-8")));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("libclang-dev"), "{err}");
    // Each missing package is named once.
    assert_eq!(err.matches("libclang-dev").count(), 1, "{err}");
    assert!(err.matches("rocksdb-tools").count() <= 1, "{err}");

    std::fs::write(dir.path().join("libclang.so"), b"").expect("touch");
    let (_, err) = check(Some(dir.path().to_str().expect("utf-8")));
    assert!(!err.contains("libclang-dev"), "{err}");
}
