// Block-checksum verification of one SST file, through RocksDB's own
// table reader. RocksDB's C API has no such call (11.8), so this is the one
// piece of C++ in ferry: `SstFileReader::VerifyChecksum` reads every block
// of the file (data, index, filter, properties, range deletions) and checks
// its trailer checksum, whatever the checksum type and format version.
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "rocksdb/options.h"
#include "rocksdb/sst_file_reader.h"

extern "C" {

// Returns 0 when every block checks out. Otherwise returns 1 and sets
// `*err` to a malloc'd, NUL-terminated message the caller frees with
// `ferry_sst_free`.
int ferry_sst_verify(const char* path, char** err) {
  *err = nullptr;
  try {
  rocksdb::Options options;
  rocksdb::SstFileReader reader(options);
  rocksdb::Status s = reader.Open(path);
  if (s.ok()) {
    rocksdb::ReadOptions ro;
    ro.verify_checksums = true;
    ro.fill_cache = false;
    s = reader.VerifyChecksum(ro);
  }
  if (s.ok()) {
    return 0;
  }
  *err = strdup(s.ToString().c_str());
  return 1;
  } catch (const std::exception& e) {
    // Nothing may unwind into Rust.
    *err = strdup(e.what());
    return 1;
  } catch (...) {
    *err = strdup("unknown C++ exception");
    return 1;
  }
}

void ferry_sst_free(char* p) { free(p); }

}  // extern "C"
