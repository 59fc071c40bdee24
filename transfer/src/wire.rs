//! Frames over quinn streams: the async shell around [`crate::protocol`].

use bytes::Bytes;
use quinn::{RecvStream, SendStream};

use crate::protocol::{DecodeError, ErrorCode, Frame, FrameHeader, HEADER_LEN};

/// Errors of reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream ended before a whole frame arrived.
    #[error("stream finished early ({0} bytes read)")]
    FinishedEarly(usize),
    /// The peer sent a frame we cannot decode.
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    /// The stream or connection failed while reading.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream or connection failed while writing.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was reset or closed.
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// The peer answered with an error frame.
    #[error("peer error {code:?}: {message}")]
    Peer { code: ErrorCode, message: String },
    /// The peer sent a frame that is not valid here.
    #[error("unexpected {got} frame while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
}

/// Reads one frame; `Ok(None)` when the stream finished cleanly before a
/// new frame began. The length is checked against the frame type's maximum
/// before the body is allocated.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Option<Frame>, WireError> {
    read_frame_within(recv, u32::MAX).await
}

/// Like [`read_frame`], but refuses any frame longer than `max` as well:
/// the first frame of an unauthenticated peer may only be a small `Hello`,
/// so nothing larger is ever allocated for it.
pub async fn read_frame_within(
    recv: &mut RecvStream,
    max: u32,
) -> Result<Option<Frame>, WireError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match recv.read(&mut h[got..]).await? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(WireError::FinishedEarly(got)),
        }
    }
    let header = FrameHeader::parse(h)?;
    if header.len > max {
        return Err(crate::protocol::DecodeError::TooLarge {
            ty: header.ty,
            len: header.len,
            max,
        }
        .into());
    }
    // Collect the body from quinn's own buffers: one copy, no zeroing.
    let len = header.len as usize;
    let mut body = bytes::BytesMut::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await? {
            Some(c) => body.extend_from_slice(&c.bytes),
            None => return Err(WireError::FinishedEarly(HEADER_LEN + body.len())),
        }
    }
    Ok(Some(Frame::decode(header, body.freeze())?))
}

/// Reads one frame and fails if the stream ended instead.
pub async fn expect_frame(recv: &mut RecvStream) -> Result<Frame, WireError> {
    match read_frame(recv).await? {
        Some(Frame::Error { code, message }) => Err(WireError::Peer { code, message }),
        Some(f) => Ok(f),
        None => Err(WireError::FinishedEarly(0)),
    }
}

/// Writes one frame; bulk payloads are written without copying them.
pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), WireError> {
    let mut head = Vec::with_capacity(64);
    let bulk = frame.encode_split(&mut head);
    match bulk {
        Some(b) => {
            let mut parts = [Bytes::from(head), b];
            send.write_all_chunks(&mut parts).await?;
        }
        None => send.write_all(&head).await?,
    }
    Ok(())
}

/// Sends an error frame and finishes the stream (best effort).
pub async fn send_error(send: &mut SendStream, code: ErrorCode, message: impl Into<String>) {
    let _ = write_frame(
        send,
        &Frame::Error {
            code,
            message: message.into(),
        },
    )
    .await;
    let _ = send.finish();
}
