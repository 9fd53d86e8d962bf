//! Typed validation errors: every way a byte string can fail to be a model.

use core::fmt;

/// Which part of a file an error points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The 64-byte file header.
    Header,
    /// Entry `n` of the section table.
    Section(u32),
    /// Tensor record `n`.
    Tensor(u32),
    /// Op record `n` (execution order).
    Op(u32),
    /// Graph input or output record `n`.
    GraphIo(u32),
    /// Metadata entry `n`.
    Meta(u32),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Header => write!(f, "header"),
            Place::Section(i) => write!(f, "section #{i}"),
            Place::Tensor(i) => write!(f, "tensor #{i}"),
            Place::Op(i) => write!(f, "op #{i}"),
            Place::GraphIo(i) => write!(f, "graph input/output #{i}"),
            Place::Meta(i) => write!(f, "metadata entry #{i}"),
        }
    }
}

/// Why a byte string is not a valid `.etm` (or `.eta`) file.
///
/// Field names say what each number is: byte offsets and lengths, or record indices.
///
/// Every variant names where the problem is, so a user can tell a truncated download from a file
/// written by a newer tool.
#[allow(missing_docs)] // variant fields are named for what they hold
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    /// The file is shorter than a structure that must be there.
    Truncated {
        place: Place,
        needed: u64,
        available: u64,
    },
    /// The first bytes are not the expected magic number.
    BadMagic,
    /// The file was written by an incompatible format version.
    UnsupportedVersion { major: u16, minor: u16 },
    /// The stored checksum does not match the bytes.
    Checksum { stored: u32, computed: u32 },
    /// The buffer does not start at the alignment the format needs for in-place use.
    MisalignedBuffer { required: u32 },
    /// A required section is missing, or a section kind appears twice.
    Section { kind: u32, problem: SectionProblem },
    /// A record points outside its section or the file.
    OutOfBounds {
        place: Place,
        offset: u64,
        len: u64,
        limit: u64,
    },
    /// A data offset is not aligned as the format requires.
    Misaligned {
        place: Place,
        offset: u64,
        required: u32,
    },
    /// An enumerated field holds an unknown value.
    UnknownCode {
        place: Place,
        field: &'static str,
        value: u32,
    },
    /// A tensor id refers past the tensor table.
    BadTensorId { place: Place, id: u32 },
    /// A shape is invalid (rank too high, zero-sized where forbidden, byte size mismatch).
    BadShape { place: Place, what: &'static str },
    /// An op has the wrong number of inputs or outputs.
    Arity {
        place: Place,
        expected: &'static str,
        found: u32,
    },
    /// An op's attributes are malformed or inconsistent with its tensors.
    BadAttribute { place: Place, what: &'static str },
    /// A tensor's data type does not fit where it is used.
    BadDType { place: Place, what: &'static str },
    /// Two tensors that are live at the same time share arena bytes, or a tensor lies outside the
    /// arena.
    ArenaOverlap { a: u32, b: u32 },
    /// A tensor is read before any op (or the caller) has written it.
    UseBeforeDefinition { place: Place, tensor: u32 },
    /// A string is not valid UTF-8.
    BadString { place: Place },
}

/// What is wrong with a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionProblem {
    /// The model needs this section and it is absent.
    Missing,
    /// The same section kind appears twice.
    Duplicate,
    /// The section length is not a whole number of records.
    RaggedLength,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FormatError::*;
        match *self {
            Truncated { place, needed, available } => {
                write!(f, "{place}: file truncated (needs {needed} bytes, has {available})")
            }
            BadMagic => write!(f, "header: not an edgetune file (bad magic)"),
            UnsupportedVersion { major, minor } => {
                write!(f, "header: unsupported format version {major}.{minor}")
            }
            Checksum { stored, computed } => write!(
                f,
                "header: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the file is corrupt"
            ),
            MisalignedBuffer { required } => write!(
                f,
                "buffer: model bytes must start at a {required}-byte aligned address to be used in place"
            ),
            Section { kind, problem } => write!(f, "section kind {kind}: {problem:?}"),
            OutOfBounds { place, offset, len, limit } => write!(
                f,
                "{place}: range {offset}..{} lies outside 0..{limit}",
                offset.saturating_add(len)
            ),
            Misaligned { place, offset, required } => {
                write!(f, "{place}: offset {offset} is not {required}-byte aligned")
            }
            UnknownCode { place, field, value } => write!(f, "{place}: unknown {field} code {value}"),
            BadTensorId { place, id } => write!(f, "{place}: tensor id {id} does not exist"),
            BadShape { place, what } => write!(f, "{place}: bad shape: {what}"),
            Arity { place, expected, found } => {
                write!(f, "{place}: expected {expected} tensors, found {found}")
            }
            BadAttribute { place, what } => write!(f, "{place}: bad attribute: {what}"),
            BadDType { place, what } => write!(f, "{place}: bad data type: {what}"),
            ArenaOverlap { a, b } => write!(
                f,
                "arena plan: tensors #{a} and #{b} are live together but share bytes (or lie outside the arena)"
            ),
            UseBeforeDefinition { place, tensor } => {
                write!(f, "{place}: reads tensor #{tensor} before it is written")
            }
            BadString { place } => write!(f, "{place}: string is not UTF-8"),
        }
    }
}

impl core::error::Error for FormatError {}
