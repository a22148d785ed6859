//! The graph file format, version 2, and its decoder: pure functions over bytes, so they can be fuzzed.
//!
//! ```text
//! offset  size         field
//! 0       8            magic, b"USINE-GR"
//! 8       2            format version, u16 little-endian (2)
//! 10      4            header length H, u32 little-endian, at most 64 KiB
//! 14      H            header, JSON (see `Header`): readable without touching the payload
//! 14+H    P            payload, encoded by the codec the header names; P is the header's `payload_len`
//!         pad          zeros up to the raw section's offset, a multiple of 4 KiB (none without one)
//! O       R            the raw section: bytes served from the file's mapping as they lie, never
//!                      decoded nor copied (an engine's weights); O and R are the header's
//!                      `raw_offset` and `raw_len`
//! end-16  16           XXH3-128 of every byte before it, u128 little-endian
//! ```
//!
//! Version 1 is version 2 without the raw section (and without its two header fields): it is read as
//! such, and written again as version 2 when its graph is next saved.
//!
//! The whole file is verified at every read, the raw section included: XXH3-128 reads about 27 GB/s on
//! this project's machine (37 to 41 ms a GiB), a small part of a load from disk and under a tenth of a
//! 1 GB model's first token, for the promise that a damaged graph is never run.
//!
//! The decoder trusts no length: each is checked against the real size of the file before use, and the
//! checksum is verified before the version is believed, the header parsed or the payload decoded. Every
//! later format keeps the magic and the trailer, so this holds across versions; and the digest that
//! names a file covers the format version and the codec, so two formats never share a file name.

use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_128;

use crate::key::GraphKey;

/// The first bytes of every graph file.
pub const MAGIC: [u8; 8] = *b"USINE-GR";
/// The newest format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 2;
/// The alignment of a raw section in the file: a page, so that a mapping of the file serves it at a
/// page boundary.
pub const RAW_ALIGN: u64 = 4096;
/// Longest header, in bytes.
pub const MAX_HEADER_LEN: u32 = 64 * 1024;
/// Magic, version and header length.
pub(crate) const PREFIX_LEN: usize = 14;
/// The trailing checksum.
pub(crate) const TRAILER_LEN: usize = 16;

/// The readable header of a graph file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The format version, as in the prefix.
    pub format: u16,
    /// Every part of the key the graph was saved under.
    pub key: GraphKey,
    /// The payload's codec, for instance `bincode-1.3.3`.
    pub codec: String,
    /// When the graph was saved, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Length of the payload in bytes.
    pub payload_len: u64,
    /// XXH3-128 of the payload alone, in hex, to compare payloads without reading them.
    pub payload_xxh3: String,
    /// Where the raw section starts in the file (a multiple of [`RAW_ALIGN`]); the end of the payload
    /// when there is none. Absent from version 1's headers.
    #[serde(default)]
    pub raw_offset: u64,
    /// Length of the raw section in bytes; 0 for none.
    #[serde(default)]
    pub raw_len: u64,
}

/// Why a file is not a valid graph file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// Shorter than the smallest possible file (an empty file, say).
    #[error("truncated: {len} bytes, fewer than the {min} of an empty graph")]
    Truncated {
        /// The file's length.
        len: u64,
        /// The least a valid file holds.
        min: u64,
    },
    /// Not a graph file at all.
    #[error("wrong magic bytes")]
    BadMagic,
    /// A length field points outside the file or exceeds its limit.
    #[error("the {field} length says {claimed} bytes, the file allows {actual}")]
    BadLength {
        /// Which length.
        field: &'static str,
        /// What the file claims.
        claimed: u64,
        /// What is possible.
        actual: u64,
    },
    /// The checksum does not match: a flipped bit, a torn write.
    #[error("checksum mismatch")]
    Checksum,
    /// The header is not the JSON it should be.
    #[error("unreadable header: {0}")]
    Header(String),
}

impl Corruption {
    /// A short fixed name, used as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "truncated",
            Self::BadMagic => "bad_magic",
            Self::BadLength { .. } => "bad_length",
            Self::Checksum => "checksum",
            Self::Header(_) => "header",
        }
    }
}

/// What the decoder found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid file of this format: its header and its payload bytes.
    Valid {
        /// The parsed header.
        header: Box<Header>,
        /// The payload, still encoded.
        payload: &'a [u8],
        /// Where the raw section lies in the file's bytes (empty when there is none).
        raw: std::ops::Range<usize>,
    },
    /// A file of a format newer than this build knows: left alone.
    Newer {
        /// Its format version.
        format: u16,
    },
}

/// Writes a graph file's bytes, piece by piece, computing the trailer as it goes.
pub(crate) struct Encoder {
    hasher: XxHash3_128,
}

impl Encoder {
    /// The prefix and header of a file holding `header`.
    pub(crate) fn start(header: &Header) -> (Self, Vec<u8>) {
        let json = serde_json::to_vec(header).expect("a header is plain data");
        let mut head = Vec::with_capacity(PREFIX_LEN + json.len());
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&u32::try_from(json.len()).expect("a header is far below 4 GiB").to_le_bytes());
        head.extend_from_slice(&json);
        let mut hasher = XxHash3_128::new();
        hasher.write(&head);
        (Self { hasher }, head)
    }

    /// Adds the payload to the checksum.
    pub(crate) fn payload(&mut self, payload: &[u8]) {
        self.hasher.write(payload);
    }

    /// Adds the padding before the raw section and the raw section to the checksum; returns the padding.
    pub(crate) fn raw(&mut self, padding: usize, raw: &[u8]) -> Vec<u8> {
        let zeros = vec![0; padding];
        self.hasher.write(&zeros);
        self.hasher.write(raw);
        zeros
    }

    /// The trailer.
    pub(crate) fn finish(self) -> [u8; TRAILER_LEN] {
        self.hasher.finish_128().to_le_bytes()
    }
}

/// The XXH3-128 of a payload, as in the header.
pub(crate) fn payload_digest(payload: &[u8]) -> String {
    format!("{:032x}", XxHash3_128::oneshot(payload))
}

/// Reads the prefix: checks the magic, and for this format the header length; returns the format
/// version and the header length. Version 0 does not exist.
fn prefix(bytes: &[u8]) -> Result<(u16, usize), Corruption> {
    if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
        return Err(Corruption::BadMagic);
    }
    if bytes.len() < PREFIX_LEN {
        return Err(Corruption::Truncated { len: bytes.len() as u64, min: (PREFIX_LEN + TRAILER_LEN) as u64 });
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version == 0 {
        return Err(Corruption::Header("format version 0 does not exist".into()));
    }
    let header_len = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
    if version <= FORMAT_VERSION && header_len > MAX_HEADER_LEN {
        return Err(Corruption::BadLength {
            field: "header",
            claimed: header_len.into(),
            actual: MAX_HEADER_LEN.into(),
        });
    }
    Ok((version, header_len as usize))
}

/// Decodes a whole file: verifies the checksum, then parses the header and locates the payload.
///
/// Every format version, this one and any later one, starts with the same magic and ends with the
/// XXH3-128 of all the bytes before it. The checksum is verified before anything else is trusted, the
/// version included: a flipped bit never passes a damaged file off as a newer one.
pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>, Corruption> {
    let min = PREFIX_LEN + TRAILER_LEN;
    if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
        return Err(Corruption::BadMagic);
    }
    if bytes.len() < min {
        return Err(Corruption::Truncated { len: bytes.len() as u64, min: min as u64 });
    }
    let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let expected = u128::from_le_bytes(trailer.try_into().expect("the trailer is 16 bytes"));
    if XxHash3_128::oneshot(body) != expected {
        return Err(Corruption::Checksum);
    }
    Ok(match layout(body, body.len() as u64)? {
        Layout::Newer { format } => Decoded::Newer { format },
        Layout::Valid { header, payload, raw } => Decoded::Valid { header, payload: &body[payload], raw },
    })
}

/// Where a file's parts lie, by [`layout`].
pub(crate) enum Layout {
    Newer { format: u16 },
    Valid { header: Box<Header>, payload: std::ops::Range<usize>, raw: std::ops::Range<usize> },
}

/// The layout of a file whose checksum holds, from its start alone: `head` is the start of its body
/// (at least the prefix and the header, or the whole body), `body_len` the length of all but the
/// trailer. A file that arrives in pieces is checked this way without being read again.
pub(crate) fn layout(head: &[u8], body_len: u64) -> Result<Layout, Corruption> {
    let (version, header_len) = prefix(head)?;
    if version > FORMAT_VERSION {
        return Ok(Layout::Newer { format: version });
    }
    let room = body_len - PREFIX_LEN as u64;
    if header_len as u64 > room || PREFIX_LEN + header_len > head.len() {
        return Err(Corruption::BadLength { field: "header", claimed: header_len as u64, actual: room });
    }
    let header: Header = serde_json::from_slice(&head[PREFIX_LEN..PREFIX_LEN + header_len])
        .map_err(|error| Corruption::Header(error.to_string()))?;
    if header.format != version {
        return Err(Corruption::Header(format!("format {} in the header, {version} in the prefix", header.format)));
    }
    let start = (PREFIX_LEN + header_len) as u64;
    let room = body_len - start;
    if header.payload_len > room {
        return Err(Corruption::BadLength { field: "payload", claimed: header.payload_len, actual: room });
    }
    let end = start + header.payload_len;
    let index = |at: u64| {
        usize::try_from(at).map_err(|_| Corruption::BadLength { field: "payload", claimed: at, actual: room })
    };
    let payload = index(start)?..index(end)?;
    if header.raw_len == 0 {
        // No raw section: the payload ends the body (as in every version 1 file).
        if end != body_len {
            return Err(Corruption::BadLength { field: "payload", claimed: header.payload_len, actual: room });
        }
        return Ok(Layout::Valid { header: Box::new(header), raw: payload.end..payload.end, payload });
    }
    // A raw section: aligned, after the payload, and last.
    let fits = header.raw_offset.is_multiple_of(RAW_ALIGN)
        && header.raw_offset >= end
        && header.raw_offset.checked_add(header.raw_len) == Some(body_len);
    if version < 2 || !fits {
        let actual = body_len.saturating_sub(header.raw_offset);
        return Err(Corruption::BadLength { field: "raw", claimed: header.raw_len, actual });
    }
    let raw = index(header.raw_offset)?..index(body_len)?;
    Ok(Layout::Valid { header: Box::new(header), payload, raw })
}

/// Where a raw section of a file whose payload ends at `payload_end` starts, and the padding before it.
pub(crate) fn raw_place(payload_end: u64) -> (u64, usize) {
    let offset = payload_end.next_multiple_of(RAW_ALIGN);
    (offset, usize::try_from(offset - payload_end).expect("under a page"))
}

/// What the start of a file says, read without the payload and without the checksum.
#[derive(Debug)]
pub(crate) enum HeaderRead {
    /// A header of this format.
    Valid(Header),
    /// A newer format, whose header this build does not read.
    Newer(u16),
    /// Not a readable header.
    Unreadable(Corruption),
}

/// Reads only the header from the start of a file: enough to list it. `read` fills a buffer from the
/// file's start and returns how much it read.
pub(crate) fn read_header(mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize>) -> std::io::Result<HeaderRead> {
    let mut start = [0u8; PREFIX_LEN];
    let got = read_full(&mut read, &mut start)?;
    let (version, header_len) = match prefix(&start[..got]) {
        Ok(found) => found,
        Err(corruption) => return Ok(HeaderRead::Unreadable(corruption)),
    };
    if version > FORMAT_VERSION {
        return Ok(HeaderRead::Newer(version));
    }
    let mut json = vec![0u8; header_len];
    let got = read_full(&mut read, &mut json)?;
    if got < header_len {
        let corruption = Corruption::BadLength { field: "header", claimed: header_len as u64, actual: got as u64 };
        return Ok(HeaderRead::Unreadable(corruption));
    }
    Ok(match serde_json::from_slice(&json) {
        Ok(header) => HeaderRead::Valid(header),
        Err(error) => HeaderRead::Unreadable(Corruption::Header(error.to_string())),
    })
}

fn read_full(read: &mut impl FnMut(&mut [u8]) -> std::io::Result<usize>, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
