//! Write batches: the operations a client submits ([`Batch`]) and the
//! serialized form that crosses the wire and the WAL ([`RawBatch`]).
//!
//! A [`RawBatch`] holds RocksDB's own serialization: a 12-byte header
//! (fixed64 sequence, fixed32 count) followed by the records. Bytes that
//! arrive from a peer are parsed record by record before they are trusted:
//! the header count must equal the number of records, every length must fit,
//! and only record types ferry knows how to replicate are accepted.

use bytes::Bytes;

use crate::error::{Error, Result, Seq};

/// The size of RocksDB's write-batch header.
pub const HEADER_LEN: usize = 12;

/// One operation of a client batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// An atomic multi-operation write, built by a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub(crate) ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    pub fn push(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}

/// A committed batch in RocksDB's serialization, tagged with the sequence
/// range it was committed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBatch {
    first: Seq,
    count: u32,
    data: Bytes,
}

impl RawBatch {
    /// Parses `data` as a RocksDB write batch committed at `first`.
    ///
    /// Checks the header, every record and that the record count equals the
    /// header's count. `first` is taken from the caller (the WAL iterator or
    /// the frame that carried the batch); the header's own sequence field is
    /// not trusted, because RocksDB does not always stamp it.
    pub fn parse(first: Seq, data: Bytes) -> Result<Self> {
        let count = validate(&data)?;
        if count == 0 {
            return Err(malformed("batch has no operations"));
        }
        if first == 0 || first.checked_add(u64::from(count) - 1).is_none() {
            return Err(malformed(format!(
                "batch sequence {first} with {count} operations is out of range"
            )));
        }
        Ok(Self { first, count, data })
    }

    /// Builds a batch from parts that are already known to be consistent
    /// (produced by this process's RocksDB).
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn from_trusted(first: Seq, count: u32, data: Bytes) -> Self {
        Self { first, count, data }
    }

    /// The sequence of the first operation.
    pub fn first(&self) -> Seq {
        self.first
    }

    /// The sequence of the last operation.
    pub fn last(&self) -> Seq {
        self.first + u64::from(self.count) - 1
    }

    /// How many operations (and so sequence numbers) the batch holds.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// RocksDB's serialized batch.
    pub fn data(&self) -> &Bytes {
        &self.data
    }
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        what: "write batch",
        reason: reason.into(),
    }
}

/// Walks every record of a serialized batch and returns its operation count.
fn validate(data: &[u8]) -> Result<u32> {
    let header_count = header_count(data)?;
    let mut found: u32 = 0;
    walk_records(data, |counts, _| {
        if counts {
            found = found
                .checked_add(1)
                .ok_or_else(|| malformed("too many records"))?;
        }
        Ok(())
    })?;
    if found != header_count {
        return Err(malformed(format!(
            "header says {header_count} operations, found {found}"
        )));
    }
    Ok(found)
}

fn header_count(data: &[u8]) -> Result<u32> {
    if data.len() < HEADER_LEN {
        return Err(malformed(format!(
            "{} bytes is shorter than the header",
            data.len()
        )));
    }
    Ok(u32::from_le_bytes([data[8], data[9], data[10], data[11]]))
}

/// Calls `f(counts, bytes)` for every record of a serialized batch, in
/// order: `counts` tells whether the record takes a sequence number (every
/// operation does; `LogData` does not), `bytes` is the whole record (tag and
/// fields). Records are self-delimiting, so their concatenation is
/// unambiguous whatever batches they were cut into.
pub(crate) fn walk_records(
    data: &[u8],
    mut f: impl FnMut(bool, &[u8]) -> Result<()>,
) -> Result<()> {
    header_count(data)?;
    let mut r = Reader {
        buf: &data[HEADER_LEN..],
    };
    while !r.buf.is_empty() {
        let start = r.buf;
        let tag = r.byte()?;
        let counts = match tag {
            // Deletion, SingleDeletion: key.
            0x00 | 0x07 => {
                r.slice()?;
                true
            }
            // Value, Merge, BlobIndex, WideColumnEntity: key, value.
            0x01 | 0x02 | 0x11 | 0x16 => {
                r.slice()?;
                r.slice()?;
                true
            }
            // LogData: a blob that is not an operation.
            0x03 => {
                r.slice()?;
                false
            }
            // Column-family Deletion, SingleDeletion: cf, key.
            0x04 | 0x08 => {
                r.varint32()?;
                r.slice()?;
                true
            }
            // Column-family Value, Merge, RangeDeletion, BlobIndex, Entity: cf, a, b.
            0x05 | 0x06 | 0x0E | 0x10 | 0x17 => {
                r.varint32()?;
                r.slice()?;
                r.slice()?;
                true
            }
            // RangeDeletion: begin, end.
            0x0F => {
                r.slice()?;
                r.slice()?;
                true
            }
            other => return Err(malformed(format!("unsupported record type {other:#04x}"))),
        };
        let used = start.len() - r.buf.len();
        f(counts, &start[..used])?;
    }
    Ok(())
}

/// The operations of a serialized batch, in order: `(kind, key, value)`,
/// one for each sequence it takes (column families are not told apart); a
/// range deletion's value is its end key.
pub fn decode_ops(data: &[u8]) -> Result<Vec<(&'static str, Vec<u8>, Option<Vec<u8>>)>> {
    let mut out = Vec::new();
    walk_records(data, |counts, record| {
        if !counts {
            return Ok(());
        }
        let mut r = Reader { buf: record };
        let tag = r.byte()?;
        if matches!(tag, 0x04 | 0x05 | 0x06 | 0x08 | 0x0E | 0x10 | 0x17) {
            r.varint32()?;
        }
        let key = r.slice()?.to_vec();
        let (kind, value) = match tag {
            0x00 | 0x04 => ("delete", None),
            0x07 | 0x08 => ("single-delete", None),
            0x01 | 0x05 => ("put", Some(r.slice()?.to_vec())),
            0x02 | 0x06 => ("merge", Some(r.slice()?.to_vec())),
            0x0F | 0x0E => ("delete-range", Some(r.slice()?.to_vec())),
            0x11 | 0x10 => ("blob-index", Some(r.slice()?.to_vec())),
            _ => ("entity", Some(r.slice()?.to_vec())),
        };
        out.push((kind, key, value));
        Ok(())
    })?;
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| malformed("truncated record"))?;
        self.buf = rest;
        Ok(b)
    }

    fn varint32(&mut self) -> Result<u32> {
        let mut v: u32 = 0;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            v |= u32::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed("varint longer than 5 bytes"))
    }

    fn slice(&mut self) -> Result<&'a [u8]> {
        let len = self.varint32()? as usize;
        if len > self.buf.len() {
            return Err(malformed(format!(
                "record length {len} runs past the batch end"
            )));
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(records: &[(u8, &[&[u8]])], count: u32) -> Bytes {
        let mut v = vec![0u8; 8];
        v.extend_from_slice(&count.to_le_bytes());
        for (tag, parts) in records {
            v.push(*tag);
            for p in *parts {
                v.push(p.len() as u8);
                v.extend_from_slice(p);
            }
        }
        Bytes::from(v)
    }

    #[test]
    fn parses_puts_and_deletes() {
        let data = encode(&[(1, &[b"k", b"v"]), (0, &[b"k"])], 2);
        let b = RawBatch::parse(10, data).unwrap();
        assert_eq!((b.first(), b.last(), b.count()), (10, 11, 2));
    }

    #[test]
    fn rejects_wrong_count_truncation_and_unknown_types() {
        assert!(RawBatch::parse(1, encode(&[(1, &[b"k", b"v"])], 2)).is_err());
        let mut d = encode(&[(1, &[b"key", b"v"])], 1).to_vec();
        d.truncate(d.len() - 2);
        assert!(RawBatch::parse(1, Bytes::from(d)).is_err());
        assert!(RawBatch::parse(1, encode(&[(0x09, &[])], 1)).is_err());
        assert!(RawBatch::parse(1, Bytes::from_static(b"short")).is_err());
        assert!(RawBatch::parse(0, encode(&[(1, &[b"k", b"v"])], 1)).is_err());
        assert!(RawBatch::parse(u64::MAX, encode(&[(1, &[b"k", b"v"]), (0, &[b"k"])], 2)).is_err());
    }

    #[test]
    fn log_data_does_not_count() {
        let data = encode(&[(3, &[b"blob"]), (1, &[b"k", b"v"])], 1);
        assert_eq!(RawBatch::parse(5, data).unwrap().count(), 1);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data: Vec<u8>, first: u64) {
            let _ = RawBatch::parse(first, Bytes::from(data));
        }
    }
}
