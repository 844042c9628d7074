//! The wire protocol between the simulated broker host and [`crate::adapter`]:
//! length-prefixed frames (4-byte big-endian length, then a JSON body) over
//! `turmoil::net::TcpStream`.
//!
//! The decoder is total: any byte string yields frames or a typed
//! [`FrameError`], never a panic (`tests/frame.rs` fuzzes it).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame body accepted, in bytes.
pub const MAX_FRAME: usize = 1 << 20;
/// Bytes of the length prefix.
pub const HEADER: usize = 4;

/// A topic partition on the wire.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WireTp {
    pub topic: String,
    pub partition: u32,
}

/// One request, numbered so its response can be matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    pub body: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub id: u64,
    pub body: Response,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Append a message. `producer` = (producer id, sequence): the broker keeps
    /// the highest sequence per producer and does not store a sequence twice
    /// (Kafka's idempotent producer).
    Produce {
        topic: String,
        key: Option<Vec<u8>>,
        headers: Vec<(String, Vec<u8>)>,
        payload: Vec<u8>,
        producer: Option<(u64, u64)>,
    },
    EnsureTopic {
        topic: String,
        partitions: u32,
    },
    /// Join a group; `previous` is this client's former member id, which the
    /// broker removes first (its partitions were already given up as lost).
    Join {
        group: String,
        topics: Vec<String>,
        client: String,
        previous: Option<u64>,
    },
    /// Heartbeat + fetch: acknowledges group events up to `ack_events` and
    /// fetches up to `max` messages from the given positions.
    Poll {
        group: String,
        member: u64,
        ack_events: u64,
        fetch: Vec<(WireTp, u64)>,
        max: u32,
    },
    Commit {
        group: String,
        member: u64,
        offsets: Vec<(WireTp, u64)>,
    },
    Release {
        group: String,
        member: u64,
        partitions: Vec<WireTp>,
    },
    SetTopics {
        group: String,
        member: u64,
        topics: Vec<String>,
    },
    Leave {
        group: String,
        member: u64,
    },
    /// The group's end and committed offsets on every partition of `topics`.
    Lag {
        group: String,
        topics: Vec<String>,
    },
}

/// A group change for one member, numbered per member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WireEvent {
    /// Partitions now owned, with the committed offset to start from.
    Assigned(Vec<(WireTp, u64)>),
    /// Partitions to finish, commit and release.
    Revoked(Vec<WireTp>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireMessage {
    pub tp: WireTp,
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
    /// Milliseconds since the Unix epoch, in simulated time.
    pub timestamp_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    UnknownTopic,
    CommitRejected,
    Config,
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Produced {
        partition: u32,
        offset: u64,
        duplicate: bool,
    },
    Ok,
    Joined {
        member: u64,
        generation: u64,
    },
    Polled {
        generation: u64,
        events: Vec<(u64, WireEvent)>,
        messages: Vec<WireMessage>,
    },
    /// The member is not (or no longer) in the group: session expired,
    /// broker restarted, or it left.
    UnknownMember,
    /// Answer to `Lag`: (partition, end offset, committed offset).
    Lag {
        partitions: Vec<(WireTp, u64, u64)>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("empty frame")]
    Empty,
    #[error("malformed frame body: {0}")]
    Malformed(String),
    #[error("truncated frame: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
}

/// Why a connection call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(String),
    #[error("connection closed by peer")]
    Closed,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("timed out")]
    Timeout,
    #[error("response {got} does not answer request {want}")]
    Mismatch { want: u64, got: u64 },
}

/// Encodes one frame: length prefix, then the JSON body.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("wire types always serialize");
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks a length prefix.
fn frame_len(header: [u8; HEADER]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len, limit: MAX_FRAME });
    }
    Ok(len)
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decodes the first frame of `bytes`, returning it and the bytes it used.
/// An incomplete frame is [`FrameError::Truncated`].
pub fn decode_one<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), FrameError> {
    if bytes.len() < HEADER {
        return Err(FrameError::Truncated { have: bytes.len(), need: HEADER });
    }
    let len = frame_len([bytes[0], bytes[1], bytes[2], bytes[3]])?;
    let end = HEADER + len;
    if bytes.len() < end {
        return Err(FrameError::Truncated { have: bytes.len(), need: end });
    }
    Ok((parse(&bytes[HEADER..end])?, end))
}

/// Incremental decoder for a byte stream: push what arrives, take frames.
/// After an error the stream is unusable (the caller drops the connection).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = frame_len([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])?;
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let msg = parse(&self.buf[HEADER..HEADER + len]);
        self.buf.drain(..HEADER + len);
        msg.map(Some)
    }

    /// Bytes received but not yet part of a complete frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Reads one frame from `r`. Not cancel-safe: a caller that gives up
/// mid-frame must drop the connection.
pub async fn read_frame<T: DeserializeOwned>(r: &mut (impl AsyncRead + Unpin)) -> Result<T, ConnError> {
    let mut header = [0u8; HEADER];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ConnError::Closed),
        Err(e) => return Err(ConnError::Io(e.to_string())),
    }
    let len = frame_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| ConnError::Io(e.to_string()))?;
    Ok(parse(&body)?)
}

pub async fn write_frame<T: Serialize>(w: &mut (impl AsyncWrite + Unpin), msg: &T) -> Result<(), ConnError> {
    w.write_all(&encode(msg)).await.map_err(|e| ConnError::Io(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_the_incremental_decoder() {
        let req = RequestFrame {
            id: 7,
            body: Request::Commit {
                group: "g".into(),
                member: 3,
                offsets: vec![(WireTp { topic: "t".into(), partition: 1 }, 9)],
            },
        };
        let bytes = encode(&req);
        let mut d = FrameDecoder::new();
        for b in &bytes[..bytes.len() - 1] {
            d.push(std::slice::from_ref(b));
            assert_eq!(d.next_frame::<RequestFrame>().unwrap(), None);
        }
        d.push(&bytes[bytes.len() - 1..]);
        assert_eq!(d.next_frame::<RequestFrame>().unwrap(), Some(req.clone()));
        assert_eq!(decode_one::<RequestFrame>(&bytes).unwrap(), (req, bytes.len()));
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert_eq!(decode_one::<RequestFrame>(&[0, 0]), Err(FrameError::Truncated { have: 2, need: 4 }));
        assert_eq!(decode_one::<RequestFrame>(&[0, 0, 0, 0]), Err(FrameError::Empty));
        assert!(matches!(decode_one::<RequestFrame>(&[0xff, 0, 0, 0]), Err(FrameError::TooLarge { .. })));
        assert!(matches!(decode_one::<RequestFrame>(&[0, 0, 0, 2, b'{', b'x']), Err(FrameError::Malformed(_))));
    }
}
