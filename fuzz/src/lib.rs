//! The wire codec, compiled from `transfer/src/protocol.rs` itself (it
//! depends only on `bytes` and two constants of ferry-engine), so the fuzz
//! targets exercise exactly the decoder the leader and followers run.
#![allow(dead_code)]

#[path = "../../transfer/src/protocol.rs"]
pub mod protocol;

use bytes::Bytes;
use protocol::{Frame, FrameHeader, HEADER_LEN};

/// Decodes `data` the way `wire::read_frame_within` does: a header bounded
/// by its type and by `max`, then exactly that many body bytes. A frame
/// that decodes must encode back to a frame that decodes the same.
pub fn decode_checked(data: &[u8], max: u32) {
    if data.len() < HEADER_LEN {
        return;
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&data[..HEADER_LEN]);
    let Ok(header) = FrameHeader::parse(h) else {
        return;
    };
    if header.len > max {
        return;
    }
    let body = &data[HEADER_LEN..];
    if body.len() < header.len as usize {
        return;
    }
    let body = Bytes::copy_from_slice(&body[..header.len as usize]);
    let Ok(frame) = Frame::decode(header, body) else {
        return;
    };
    round_trip(&frame);
}

fn round_trip(frame: &Frame) {
    let mut out = Vec::new();
    frame.encode(&mut out);
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&out[..HEADER_LEN]);
    let header = FrameHeader::parse(h).expect("an encoded frame has a valid header");
    let again = Frame::decode(header, Bytes::copy_from_slice(&out[HEADER_LEN..]))
        .expect("an encoded frame decodes");
    assert_eq!(&again, frame, "decode(encode(f)) != f");
}
