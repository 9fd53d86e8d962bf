//! On-disk records of the `.etm` format (see `core/FORMAT.md`).
//!
//! All integers are little-endian and every record is `Unaligned`, so views over the bytes need no
//! alignment except where f32/i64 weight data is used in place.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First eight bytes of every `.etm` file (PNG-style: catches text-mode and 7-bit mangling).
pub const MAGIC: [u8; 8] = *b"\x89ETM\r\n\x1a\n";
/// Format major version this crate reads and writes; files with another major are rejected.
pub const VERSION_MAJOR: u16 = 1;
/// Format minor version this crate writes; higher minors only add sections older readers skip.
pub const VERSION_MINOR: u16 = 0;
/// Alignment of every section, weight blob and arena tensor.
pub const ALIGN: u64 = 64;
/// Alignment the caller's model buffer must have so f32/i64 data can be viewed in place.
pub const BUFFER_ALIGN: usize = 8;
/// Byte offset of the CRC32 field in the header.
pub const CRC_OFFSET: usize = 24;
/// "No tensor" in op records.
pub const NO_TENSOR: u32 = u32::MAX;
/// Tensor flag: an arena tensor that reuses another's bytes under a new shape (a reshape that
/// costs nothing). `params[0]` holds the id of the tensor that owns the bytes.
pub const FLAG_ALIAS: u32 = 1;
/// Most inputs one op may have.
pub const MAX_OP_INPUTS: usize = 32;

/// The 64-byte file header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FileHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION_MAJOR`] of the writer.
    pub version_major: U16,
    /// [`VERSION_MINOR`] of the writer.
    pub version_minor: U16,
    /// Size of this header (64).
    pub header_len: U32,
    /// Bytes in the whole file.
    pub file_len: U64,
    /// CRC-32 (IEEE) of the file with this field taken as absent.
    pub crc32: U32,
    /// Entries in the section table, which follows the header.
    pub section_count: U32,
    /// Bytes of activation arena the model needs.
    pub arena_bytes: U64,
    /// Reserved, zero.
    pub flags: U32,
    /// Reserved, zero.
    pub reserved: [u8; 20],
}

/// One entry of the section table.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SectionEntry {
    /// A [`SectionKind`] code.
    pub kind: U32,
    /// Number of records (or bytes for byte sections).
    pub count: U32,
    /// Absolute byte offset, multiple of [`ALIGN`].
    pub offset: U64,
    /// Length in bytes.
    pub len: U64,
}

/// Section kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SectionKind {
    /// UTF-8 bytes that names point into.
    Strings = 1,
    /// [`TensorRecord`]s.
    Tensors = 2,
    /// [`OpRecord`]s in execution order.
    Ops = 3,
    /// `u32` tensor ids: each op's inputs then outputs.
    OpTensors = 4,
    /// `u32` attribute words.
    Attrs = 5,
    /// [`IoRecord`]s: graph inputs and outputs.
    GraphIo = 6,
    /// [`MetaRecord`]s: free-form key/value strings.
    Meta = 7,
    /// Weight blobs, each at a multiple of [`ALIGN`].
    Data = 8,
}

/// Known section kinds, in file order.
pub const SECTION_KINDS: [SectionKind; 8] = [
    SectionKind::Strings,
    SectionKind::Tensors,
    SectionKind::Ops,
    SectionKind::OpTensors,
    SectionKind::Attrs,
    SectionKind::GraphIo,
    SectionKind::Meta,
    SectionKind::Data,
];

/// Storage codes in [`TensorRecord::storage`].
pub mod storage {
    /// Bytes in the data section.
    pub const CONST: u8 = 0;
    /// Bytes in the activation arena.
    pub const ARENA: u8 = 1;
}

/// A tensor: constant weight or arena activation.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TensorRecord {
    /// A [`crate::DType`] code.
    pub dtype: u8,
    /// An [`crate::Encoding`] code.
    pub encoding: u8,
    /// Number of dimensions.
    pub rank: u8,
    /// [`storage::CONST`] or [`storage::ARENA`].
    pub storage: u8,
    /// Name: offset into the string section.
    pub name_off: U32,
    /// Name: length in bytes.
    pub name_len: U32,
    /// Dimensions (unused ones zero).
    pub dims: [U32; 6],
    /// Const: absolute file offset. Arena: offset in the arena.
    pub offset: U64,
    /// Bytes.
    pub len: U64,
    /// Arena tensors: first time step the bytes are live (0 = graph input, i + 1 = written by
    /// op i).
    pub live_first: U32,
    /// Arena tensors: last time step the bytes are needed (op count + 1 for graph outputs).
    pub live_last: U32,
    /// Encoding parameters (reserved for compressed encodings).
    pub params: [U32; 4],
    /// [`FLAG_ALIAS`] or zero.
    pub flags: U32,
}

/// An op in execution order.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OpRecord {
    /// An [`crate::OpCode`].
    pub code: U16,
    /// Number of inputs.
    pub n_inputs: u8,
    /// Number of outputs.
    pub n_outputs: u8,
    /// Index of the first input id in the op-tensors section; outputs follow the inputs.
    pub io_start: U32,
    /// Index of the first attribute word.
    pub attr_start: U32,
    /// Number of attribute words.
    pub attr_len: U32,
    /// Arena tensor used as scratch, or [`NO_TENSOR`].
    pub scratch: U32,
    /// Name of the source node: offset into the string section.
    pub name_off: U32,
    /// Name length.
    pub name_len: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// A graph input or output.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IoRecord {
    /// Tensor id.
    pub tensor: U32,
    /// 0 = input, 1 = output.
    pub kind: U32,
    /// Name: offset into the string section.
    pub name_off: U32,
    /// Name length.
    pub name_len: U32,
}

/// A metadata key/value pair.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MetaRecord {
    /// Key: offset into the string section.
    pub key_off: U32,
    /// Key length.
    pub key_len: U32,
    /// Value: offset into the string section.
    pub value_off: U32,
    /// Value length.
    pub value_len: U32,
}

/// CRC-32 (IEEE) of a file, skipping the stored checksum field.
pub fn file_crc(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let cut = CRC_OFFSET.min(bytes.len());
    h.update(&bytes[..cut]);
    h.update(bytes.get(CRC_OFFSET + 4..).unwrap_or(&[]));
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn record_sizes_are_stable() {
        assert_eq!(core::mem::size_of::<FileHeader>(), 64);
        assert_eq!(core::mem::size_of::<SectionEntry>(), 24);
        assert_eq!(core::mem::size_of::<TensorRecord>(), 80);
        assert_eq!(core::mem::size_of::<OpRecord>(), 32);
        assert_eq!(core::mem::size_of::<IoRecord>(), 16);
        assert_eq!(core::mem::size_of::<MetaRecord>(), 16);
    }
}
