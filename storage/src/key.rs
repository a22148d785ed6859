//! Graph keys: the parts that decide a compiled graph, and the digest that names its file.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::CODEC;
use crate::error::{Result, StorageError};
/// The format whose readers can read every format written since, and whose number names files: the
/// first. A format that older readers cannot be served from starts a new lineage, and changes this.
const NAMED_FORMAT: u16 = 1;

/// Longest key part, in bytes.
pub const MAX_KEY_PART_LEN: usize = 1024;

/// Everything that decides the bytes of a compiled graph.
///
/// Two keys are the same graph exactly when every part is equal. The file name is a digest of all the
/// parts, so no part, however strange (`../../etc/passwd`), ever becomes a path.
///
/// ```
/// use usine_storage::GraphKey;
///
/// let key = GraphKey::new("llama-3-8b-q4", "webllm", "0.2.79")
///     .device("gpu-8gb")
///     .options(&[("context", 4096)])
///     .schema(2);
/// assert_eq!(key.file_name().len(), "0123456789abcdef0123456789abcdef.graph".len());
/// assert_ne!(key.file_name(), key.clone().schema(3).file_name());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GraphKey {
    /// The model, as the catalog names it.
    pub model: String,
    /// The engine that compiled it.
    pub engine: String,
    /// The engine's version: a new version may compile differently.
    pub engine_version: String,
    /// The device or hardware profile it was compiled for.
    pub device: String,
    /// Digest of the compile options that change the output (see [`GraphKey::options`]).
    pub options: String,
    /// Version of the payload's schema, owned by the engine (see [`Migrations`](crate::Migrations)).
    pub schema: u32,
    /// Keeps separate users of one cache folder apart.
    pub namespace: Option<String>,
}

/// One part of a [`GraphKey`], to say which part differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPart {
    /// [`GraphKey::model`].
    Model,
    /// [`GraphKey::engine`].
    Engine,
    /// [`GraphKey::engine_version`].
    EngineVersion,
    /// [`GraphKey::device`].
    Device,
    /// [`GraphKey::options`].
    Options,
    /// [`GraphKey::schema`].
    Schema,
    /// [`GraphKey::namespace`].
    Namespace,
}

impl KeyPart {
    /// Every part, in key order.
    pub const ALL: [KeyPart; 7] = [
        KeyPart::Model,
        KeyPart::Engine,
        KeyPart::EngineVersion,
        KeyPart::Device,
        KeyPart::Options,
        KeyPart::Schema,
        KeyPart::Namespace,
    ];

    /// The part's name, as in the file header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Engine => "engine",
            Self::EngineVersion => "engine_version",
            Self::Device => "device",
            Self::Options => "options",
            Self::Schema => "schema",
            Self::Namespace => "namespace",
        }
    }
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl GraphKey {
    /// A key for `model` compiled by `engine` at `engine_version`, for any device, with no options,
    /// schema 1 and no namespace.
    pub fn new(model: impl Into<String>, engine: impl Into<String>, engine_version: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            engine: engine.into(),
            engine_version: engine_version.into(),
            device: "any".into(),
            options: String::new(),
            schema: 1,
            namespace: None,
        }
    }

    /// Sets the device or hardware profile.
    #[must_use]
    pub fn device(mut self, device: impl Into<String>) -> Self {
        self.device = device.into();
        self
    }

    /// Sets the options part to a digest of `options` (any serializable value, hashed as JSON).
    #[must_use]
    pub fn options(mut self, options: &impl Serialize) -> Self {
        let json = serde_json::to_vec(options).unwrap_or_else(|error| error.to_string().into_bytes());
        self.options = blake3::hash(&json).to_hex()[..32].to_owned();
        self
    }

    /// Sets the schema version.
    #[must_use]
    pub fn schema(mut self, schema: u32) -> Self {
        self.schema = schema;
        self
    }

    /// Sets the namespace.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The file name of this key's graph: 32 hex digits of a BLAKE3 digest of every part, then `.graph`.
    pub fn file_name(&self) -> String {
        // The context names the file format's lineage and the codec: a build that writes a format its
        // predecessors cannot be served from, or another codec, names its files differently. Format 2
        // reads format 1 (a format-1 file is format 2 without a raw section), so both share names: a
        // format-1 file is served as it is, and a usine that reads only format 1 finds a format-2 file
        // newer than it knows and leaves it, neither served nor overwritten.
        let context = format!("usine-storage graph file, format {NAMED_FORMAT}, payload {CODEC}");
        let mut hasher = blake3::Hasher::new_derive_key(&context);
        for part in KeyPart::ALL {
            // Length-prefixed, so that moving bytes from one part to the next changes the digest.
            let value = self.part(part);
            hasher.update(&(value.len() as u64).to_le_bytes());
            hasher.update(value.as_bytes());
        }
        format!("{}.graph", &hasher.finalize().to_hex()[..32])
    }

    /// A part's value, as text.
    pub fn part(&self, part: KeyPart) -> String {
        match part {
            KeyPart::Model => self.model.clone(),
            KeyPart::Engine => self.engine.clone(),
            KeyPart::EngineVersion => self.engine_version.clone(),
            KeyPart::Device => self.device.clone(),
            KeyPart::Options => self.options.clone(),
            KeyPart::Schema => self.schema.to_string(),
            KeyPart::Namespace => self.namespace.clone().map_or_else(|| "(none)".into(), |ns| format!("`{ns}`")),
        }
    }

    /// The parts in which `other` differs from this key, in key order.
    pub fn differences(&self, other: &GraphKey) -> Vec<KeyPart> {
        KeyPart::ALL.into_iter().filter(|&part| self.part(part) != other.part(part)).collect()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        for part in KeyPart::ALL {
            let len = match part {
                KeyPart::Schema => continue,
                KeyPart::Namespace => self.namespace.as_ref().map_or(0, String::len),
                _ => self.part(part).len(),
            };
            if len > MAX_KEY_PART_LEN {
                return Err(StorageError::KeyPartTooLong { part, len, limit: MAX_KEY_PART_LEN });
            }
        }
        Ok(())
    }
}

impl fmt::Display for GraphKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} {} for {} (schema {}",
            self.model, self.engine, self.engine_version, self.device, self.schema
        )?;
        if let Some(namespace) = &self.namespace {
            write!(f, ", namespace {namespace}")?;
        }
        f.write_str(")")
    }
}
