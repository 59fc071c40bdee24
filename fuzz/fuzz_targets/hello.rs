//! The first frame of an unauthenticated connection: read with the leader's
//! 64 KiB Hello bound. Whatever decodes must respect the node-id bound.
#![no_main]
use ferry_fuzz::protocol::{Frame, FrameHeader, HEADER_LEN, MAX_NODE_ID};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::decode_checked(data, 64 * 1024);
    if data.len() < HEADER_LEN {
        return;
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&data[..HEADER_LEN]);
    let Ok(header) = FrameHeader::parse(h) else {
        return;
    };
    let body = &data[HEADER_LEN..];
    if header.len > 64 * 1024 || body.len() < header.len as usize {
        return;
    }
    if let Ok(Frame::Hello { node_id, .. }) = Frame::decode(
        header,
        bytes::Bytes::copy_from_slice(&body[..header.len as usize]),
    ) {
        assert!(
            node_id.len() <= MAX_NODE_ID,
            "a Hello carried a {}-byte node id",
            node_id.len()
        );
    }
});
