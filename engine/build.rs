//! Compiles `cxx/sst_verify.cc` against the RocksDB headers that
//! librocksdb-sys built the library from (it exports its source directory as
//! `DEP_ROCKSDB_CARGO_MANIFEST_DIR`), so the shim and the library always agree.

fn main() {
    if std::env::var_os("CARGO_FEATURE_ROCKSDB").is_none() {
        return;
    }
    let root = std::env::var("DEP_ROCKSDB_CARGO_MANIFEST_DIR")
        .expect("librocksdb-sys exports its source directory");
    let root = std::path::Path::new(&root);
    println!("cargo:rerun-if-changed=cxx/sst_verify.cc");
    cc::Build::new()
        .cpp(true)
        .file("cxx/sst_verify.cc")
        .include(root.join("rocksdb/include"))
        .flag("-std=c++20")
        .flag_if_supported("-Wno-unused-parameter")
        .define("NDEBUG", Some("1"))
        .compile("ferry_sst_verify");
}
