//! The payload codec: bincode 1.3.3, named in every header. The only module that names bincode, so
//! that a later switch is a migration, not a break.

use bincode::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, StorageError};

/// The codec's name, as written in the header of every graph this build saves.
pub const CODEC: &str = "bincode-1.3.3";

/// Fixed-width little-endian integers, no trailing bytes, and a size limit: a length inside the payload
/// can never make the decoder allocate more than the payload holds.
fn options(limit: u64) -> impl Options {
    bincode::DefaultOptions::new().with_fixint_encoding().with_little_endian().reject_trailing_bytes().with_limit(limit)
}

pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    options(u64::MAX)
        .serialize(value)
        .map_err(|error| StorageError::Encode { codec: CODEC, message: error.to_string() })
}

pub(crate) fn decode<T: DeserializeOwned>(payload: &[u8]) -> std::result::Result<T, String> {
    options(payload.len() as u64).deserialize(payload).map_err(|error| error.to_string())
}
