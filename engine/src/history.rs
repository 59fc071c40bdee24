//! Replication history: which leader term wrote which sequences.
//!
//! Sequence numbers alone do not identify history: a leader that lost its
//! last writes (an unsynced WAL, a restore from an older copy) and then
//! takes new ones reuses the same sequences for different batches. Like
//! PostgreSQL's timelines or Redis's replication ids, every leader term has
//! a random id and the sequence after which it began writing. A node that
//! followed term `T` up to sequence `s` holds only what a leader with this
//! history holds if `T` is one of its terms and `s` is not past the start of
//! the term that followed `T` (the history branched there).
//!
//! The history lives in `DIR/.ferry/history.json`, written atomically.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{io, Error, Result, Seq};
use crate::paths::ferry_dir;

/// The most terms a history keeps (older ones are dropped).
pub const MAX_TERMS: usize = 1024;

/// The id of one leader term.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HistoryId(pub [u8; 16]);

impl HistoryId {
    /// A new random id.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut b);
        Self(b)
    }
}

impl fmt::Display for HistoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for HistoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HistoryId({self})")
    }
}

impl FromStr for HistoryId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let v = hex::decode(s).map_err(|_| Error::Malformed {
            what: "history id",
            reason: format!("{s:?} is not hex"),
        })?;
        let b: [u8; 16] = v.try_into().map_err(|_| Error::Malformed {
            what: "history id",
            reason: format!("{s:?} is not 16 bytes"),
        })?;
        Ok(Self(b))
    }
}

impl Serialize for HistoryId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HistoryId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One leader term: its id and the last sequence before its first write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    pub id: HistoryId,
    pub start: Seq,
}

/// A node's replication history, oldest term first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub terms: Vec<Term>,
}

/// Why a position is not on a history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryMismatch {
    #[error("history {id} is unknown to this node (its history is {ours})")]
    Unknown { id: HistoryId, ours: String },
    #[error("the follower has {seq} on history {id}; this leader's history {next} began at {next_start}")]
    Branched {
        id: HistoryId,
        seq: Seq,
        next: HistoryId,
        next_start: Seq,
    },
}

fn path(data: &Path) -> PathBuf {
    ferry_dir(data).join("history.json")
}

impl History {
    /// A history of one new term that begins after `start`.
    pub fn new(start: Seq) -> Self {
        Self {
            terms: vec![Term {
                id: HistoryId::random(),
                start,
            }],
        }
    }

    /// The current (last) term.
    pub fn current(&self) -> Term {
        self.terms.last().copied().unwrap_or(Term {
            id: HistoryId([0; 16]),
            start: 0,
        })
    }

    /// Starts a new term after `start` (a promotion); returns it.
    pub fn begin_term(&mut self, start: Seq) -> Term {
        let t = Term {
            id: HistoryId::random(),
            start,
        };
        self.terms.push(t);
        if self.terms.len() > MAX_TERMS {
            self.terms.remove(0);
        }
        t
    }

    /// Checks that a node at `seq` on term `id` holds nothing this history
    /// does not.
    pub fn check(&self, id: HistoryId, seq: Seq) -> std::result::Result<(), HistoryMismatch> {
        let Some(i) = self.terms.iter().position(|t| t.id == id) else {
            return Err(HistoryMismatch::Unknown {
                id,
                ours: self.describe(),
            });
        };
        match self.terms.get(i + 1) {
            Some(next) if seq > next.start => Err(HistoryMismatch::Branched {
                id,
                seq,
                next: next.id,
                next_start: next.start,
            }),
            _ => Ok(()),
        }
    }

    /// Whether `other` holds every term of this history, in order (so a
    /// node on this history can follow a node on `other`).
    pub fn is_prefix_of(&self, other: &History) -> bool {
        self.terms.len() <= other.terms.len()
            && self.terms.iter().zip(&other.terms).all(|(a, b)| a == b)
    }

    /// `id@start, ...` for messages.
    pub fn describe(&self) -> String {
        self.terms
            .iter()
            .map(|t| format!("{}@{}", t.id, t.start))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The history stored in `data`, if any.
    pub fn load(data: &Path) -> Result<Option<Self>> {
        let p = path(data);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Malformed {
                    what: "history.json",
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &p)(e)),
        }
    }

    /// Stores this history in `data`, atomically and durably.
    pub fn save(&self, data: &Path) -> Result<()> {
        let b = serde_json::to_vec_pretty(self).map_err(|e| Error::Malformed {
            what: "history.json",
            reason: e.to_string(),
        })?;
        crate::paths::write_atomic(&path(data), &b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_on_a_history_until_it_branched() {
        let mut h = History::new(100);
        let first = h.current().id;
        assert_eq!(h.check(first, 500), Ok(()));
        let second = h.begin_term(300);
        // A follower of the first term at 300 is on the new history too ...
        assert_eq!(h.check(first, 300), Ok(()));
        // ... at 301 it holds a write the new term does not.
        assert!(matches!(
            h.check(first, 301),
            Err(HistoryMismatch::Branched {
                next_start: 300,
                ..
            })
        ));
        assert_eq!(h.check(second.id, 10_000), Ok(()));
        let stranger = HistoryId::random();
        assert!(matches!(
            h.check(stranger, 1),
            Err(HistoryMismatch::Unknown { .. })
        ));
        let mut longer = h.clone();
        longer.begin_term(400);
        assert!(h.is_prefix_of(&longer));
        assert!(!longer.is_prefix_of(&h));
        assert!(!History::new(0).is_prefix_of(&longer));
    }

    #[test]
    fn persists_and_ids_round_trip() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(History::load(d.path()).expect("load"), None);
        let mut h = History::new(7);
        h.begin_term(9);
        h.save(d.path()).expect("save");
        assert_eq!(History::load(d.path()).expect("load"), Some(h.clone()));
        let id = h.current().id;
        assert_eq!(id.to_string().parse::<HistoryId>().expect("parse"), id);
        assert!("zz".parse::<HistoryId>().is_err());
    }
}
