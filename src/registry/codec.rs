//! Framing for the registry port: pulls seed frames and lines out of a byte buffer.
//!
//! The first terminator decides: a `\n` before any NUL ends a line; a NUL first means a
//! seed frame, which runs to [`SEED_FRAME_LEN`] bytes (its NUL padding). TCP may split or
//! join messages anywhere, so this works on whatever has arrived and asks for more.

use bytes::{Buf, BytesMut};

use crate::protocol::{MAX_LINE_LEN, SEED_FRAME_LEN};

/// One complete message.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A seed frame (NUL-padded), as received.
    Seed(BytesMut),
    /// A line without its `\n`.
    Line(BytesMut),
}

/// What the buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A complete message.
    Frame(Frame),
    /// Not enough bytes yet.
    NeedMore {
        /// A seed frame's text is complete and only padding is missing; a client that
        /// sends no padding is answered after a short wait rather than the full timeout.
        padding_only: bool,
    },
    /// A message longer than the limits: answer and close.
    TooLong,
}

/// Tries to take one message from the front of `buf`.
pub fn decode(buf: &mut BytesMut) -> Decoded {
    let scan = buf.len().min(MAX_LINE_LEN);
    match buf[..scan].iter().position(|&b| b == b'\n' || b == 0) {
        Some(i) if buf[i] == b'\n' => {
            let line = buf.split_to(i);
            buf.advance(1);
            Decoded::Frame(Frame::Line(line))
        }
        Some(i) => {
            if i >= SEED_FRAME_LEN {
                return Decoded::TooLong;
            }
            if buf.len() >= SEED_FRAME_LEN {
                Decoded::Frame(Frame::Seed(buf.split_to(SEED_FRAME_LEN)))
            } else {
                Decoded::NeedMore { padding_only: true }
            }
        }
        None if buf.len() >= MAX_LINE_LEN => Decoded::TooLong,
        None => Decoded::NeedMore {
            padding_only: false,
        },
    }
}

/// Takes a seed frame whose padding never fully arrived: the text and whatever NULs came.
pub fn take_partial_seed(buf: &mut BytesMut) -> Frame {
    let n = buf.len().min(SEED_FRAME_LEN);
    Frame::Seed(buf.split_to(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::seed_frame;

    fn buf(b: &[u8]) -> BytesMut {
        BytesMut::from(b)
    }

    #[test]
    fn lines_split_and_joined() {
        let mut b = buf(b"PING\nPI");
        assert_eq!(decode(&mut b), Decoded::Frame(Frame::Line(buf(b"PING"))));
        assert_eq!(
            decode(&mut b),
            Decoded::NeedMore {
                padding_only: false
            }
        );
        b.extend_from_slice(b"NG\r\n");
        assert_eq!(decode(&mut b), Decoded::Frame(Frame::Line(buf(b"PING\r"))));
        assert!(b.is_empty());
    }

    #[test]
    fn seed_frame_in_pieces() {
        let frame = seed_frame("web");
        let mut b = buf(&frame[..2]);
        assert_eq!(
            decode(&mut b),
            Decoded::NeedMore {
                padding_only: false
            }
        );
        b.extend_from_slice(&frame[2..100]);
        assert_eq!(decode(&mut b), Decoded::NeedMore { padding_only: true });
        b.extend_from_slice(&frame[100..]);
        b.extend_from_slice(b"PING\n");
        assert_eq!(
            decode(&mut b),
            Decoded::Frame(Frame::Seed(buf(&frame)))
        );
        assert_eq!(decode(&mut b), Decoded::Frame(Frame::Line(buf(b"PING"))));
    }

    #[test]
    fn two_seed_frames_back_to_back() {
        let mut b = buf(&seed_frame("a"));
        b.extend_from_slice(&seed_frame("HEARTBEAT|a"));
        assert!(matches!(decode(&mut b), Decoded::Frame(Frame::Seed(_))));
        assert!(matches!(decode(&mut b), Decoded::Frame(Frame::Seed(_))));
        assert!(b.is_empty());
    }

    #[test]
    fn too_long() {
        let mut b = buf(&vec![b'a'; MAX_LINE_LEN]);
        assert_eq!(decode(&mut b), Decoded::TooLong);
        let mut b = buf(&vec![b'a'; SEED_FRAME_LEN]);
        b.extend_from_slice(&[0]);
        assert_eq!(decode(&mut b), Decoded::TooLong);
    }

    #[test]
    fn partial_seed_frame() {
        let mut b = buf(b"web\0");
        assert_eq!(decode(&mut b), Decoded::NeedMore { padding_only: true });
        assert_eq!(take_partial_seed(&mut b), Frame::Seed(buf(b"web\0")));
    }
}
