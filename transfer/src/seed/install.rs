//! Moving a fully verified seed into place.

use super::*;

/// Renames the staged files into the data directory, `CURRENT` last, and
/// removes the staging directory; then opens the result read-only and
/// checks it holds the manifest's sequence.
pub(super) fn finish_install(
    data: &Path,
    staging: &Path,
    manifest: &Manifest,
) -> Result<Seq, SeedError> {
    // The staged database must be at the manifest's sequence before any of
    // it becomes visible (after a crash half-way CURRENT may be in place
    // already; the check after the install covers that case).
    if staging.join("CURRENT").exists() {
        let found = Store::open_read_only(staging)?.latest_seq();
        if found != manifest.seq {
            return Err(SeedError::SequenceMismatch {
                expected: manifest.seq,
                found,
            });
        }
    }
    for f in manifest
        .files
        .iter()
        .filter(|f| f.name.as_str() != "CURRENT")
    {
        let from = staging.join(f.name.as_str());
        if from.exists() {
            std::fs::File::open(&from)
                .and_then(|h| h.sync_all())
                .map_err(io("sync", &from))?;
            std::fs::rename(&from, data.join(f.name.as_str())).map_err(io("rename", &from))?;
        }
    }
    sync_dir(data)?;
    let current = staging.join("CURRENT");
    if current.exists() {
        std::fs::File::open(&current)
            .and_then(|h| h.sync_all())
            .map_err(io("sync", &current))?;
        std::fs::rename(&current, data.join("CURRENT")).map_err(io("rename", &current))?;
        sync_dir(data)?;
    }
    // The leader's proofs of its operations up to the checkpoint, and the
    // checkpoint itself: this node shows them when it first subscribes,
    // should the checkpoint carry no WAL to prove its position from (written
    // before the seed ends, so a crash here is finished by the restart).
    let proofs: Vec<ferry_engine::WriteId> = manifest
        .proofs
        .iter()
        .map(|&(first, hash)| ferry_engine::WriteId {
            first,
            last: manifest.seq,
            hash,
        })
        .collect();
    let seeded = ferry_engine::Issued {
        seq: manifest.seq,
        manifest: manifest.id().0,
    };
    let b = serde_json::to_vec(&serde_json::json!({ "proofs": proofs, "seeded": seeded }))
        .map_err(|e| {
            SeedError::Engine(ferry_engine::Error::Malformed {
                what: "replica.json",
                reason: e.to_string(),
            })
        })?;
    ferry_engine::write_atomic(&ferry_engine::ferry_dir(data).join("replica.json"), &b)?;
    // One rename ends the seed; the deletion after it may be cut short.
    let trash = trash_dir(data);
    if trash.exists() {
        std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))?;
    }
    std::fs::rename(staging, &trash).map_err(io("rename", staging))?;
    sync_dir(&ferry_engine::ferry_dir(data))?;
    std::fs::remove_dir_all(&trash).map_err(io("remove", &trash))?;
    let found = Store::open_read_only(data)?.latest_seq();
    if found != manifest.seq {
        return Err(SeedError::SequenceMismatch {
            expected: manifest.seq,
            found,
        });
    }
    Ok(found)
}
