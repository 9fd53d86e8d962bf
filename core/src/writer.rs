//! Writes `.etm` files (host side, behind the `alloc` feature).

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use crate::format::*;
use crate::ops::{Op, Storage};
use crate::tensor::{DType, Encoding, Shape};

/// A tensor to write.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Name from the source graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Byte encoding.
    pub encoding: Encoding,
    /// Logical shape.
    pub shape: Shape,
    /// Constant bytes (written to the data section) or an arena placement.
    pub storage: Storage,
    /// Constant data (empty for arena tensors).
    pub data: Vec<u8>,
    /// Arena offset (arena tensors).
    pub arena_offset: u64,
    /// Arena byte length (arena tensors).
    pub arena_len: u64,
    /// Live range in time steps (arena tensors).
    pub live: (u32, u32),
    /// Encoding parameters.
    pub params: [u32; 4],
    /// For an arena tensor that reuses another's bytes: that tensor's id. Its placement and live
    /// range are copied from there.
    pub alias_of: Option<u32>,
}

impl TensorSpec {
    /// A constant tensor holding `data`.
    pub fn constant(
        name: impl Into<String>,
        dtype: DType,
        encoding: Encoding,
        shape: Shape,
        data: Vec<u8>,
    ) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            encoding,
            shape,
            storage: Storage::Const,
            data,
            arena_offset: 0,
            arena_len: 0,
            live: (0, 0),
            params: [0; 4],
            alias_of: None,
        }
    }

    /// An arena tensor, to be placed by a planner.
    pub fn arena(name: impl Into<String>, dtype: DType, shape: Shape) -> TensorSpec {
        let len = shape.numel() as u64 * dtype.size() as u64;
        TensorSpec {
            name: name.into(),
            dtype,
            encoding: Encoding::Plain,
            shape,
            storage: Storage::Arena,
            data: Vec::new(),
            arena_offset: 0,
            arena_len: len,
            live: (0, 0),
            params: [0; 4],
            alias_of: None,
        }
    }
}

/// An op to write.
#[derive(Debug, Clone)]
pub struct OpSpec {
    /// The op.
    pub op: Op,
    /// Input tensor ids.
    pub inputs: Vec<u32>,
    /// Output tensor ids.
    pub outputs: Vec<u32>,
    /// Scratch tensor id.
    pub scratch: Option<u32>,
    /// Source node name.
    pub name: String,
}

/// Everything a `.etm` file holds, before layout.
///
/// ```
/// use edgetune_core::writer::ModelFile;
/// let file = ModelFile::default();
/// // An empty model has no outputs, so it does not validate, but it serializes.
/// assert!(file.to_bytes().len() >= 64);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ModelFile {
    /// Tensors, indexed by id.
    pub tensors: Vec<TensorSpec>,
    /// Ops in execution order.
    pub ops: Vec<OpSpec>,
    /// Graph inputs: (name, tensor id).
    pub inputs: Vec<(String, u32)>,
    /// Graph outputs: (name, tensor id).
    pub outputs: Vec<(String, u32)>,
    /// Metadata.
    pub meta: Vec<(String, String)>,
    /// Arena bytes.
    pub arena_bytes: u64,
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(ALIGN) * ALIGN
}

struct Strings(Vec<u8>);

impl Strings {
    fn add(&mut self, s: &str) -> (U32, U32) {
        let off = self.0.len() as u32;
        self.0.extend_from_slice(s.as_bytes());
        (U32::new(off), U32::new(s.len() as u32))
    }
}

impl ModelFile {
    /// Serializes the file: header, section table, sections (64-byte aligned) and CRC.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut strings = Strings(Vec::new());
        // Data section layout first: constant offsets are absolute, so they are patched in below.
        let mut data = Vec::new();
        let mut const_rel = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            if t.storage == Storage::Const {
                let rel = align_up(data.len() as u64);
                data.resize(rel as usize, 0);
                data.extend_from_slice(&t.data);
                const_rel.push(rel);
            } else {
                const_rel.push(0);
            }
        }
        let mut tensor_recs: Vec<TensorRecord> = Vec::new();
        for t in &self.tensors {
            let (name_off, name_len) = strings.add(&t.name);
            let mut dims = [U32::new(0); 6];
            for (d, &s) in dims.iter_mut().zip(t.shape.dims()) {
                *d = U32::new(s);
            }
            let root = t.alias_of.map_or(t, |r| &self.tensors[r as usize]);
            let (len, live) = match t.storage {
                Storage::Const => (t.data.len() as u64, (0, 0)),
                Storage::Arena => (root.arena_len, root.live),
            };
            let mut params = t.params;
            if let Some(r) = t.alias_of {
                params[0] = r;
            }
            tensor_recs.push(TensorRecord {
                dtype: t.dtype as u8,
                encoding: t.encoding as u8,
                rank: t.shape.rank() as u8,
                storage: if t.storage == Storage::Const {
                    storage::CONST
                } else {
                    storage::ARENA
                },
                name_off,
                name_len,
                dims,
                offset: U64::new(root.arena_offset),
                len: U64::new(len),
                live_first: U32::new(live.0),
                live_last: U32::new(live.1),
                params: params.map(U32::new),
                flags: U32::new(if t.alias_of.is_some() { FLAG_ALIAS } else { 0 }),
            });
        }
        let mut op_recs = Vec::new();
        let mut op_tensors: Vec<U32> = Vec::new();
        let mut attrs: Vec<U32> = Vec::new();
        for o in &self.ops {
            let (name_off, name_len) = strings.add(&o.name);
            let words = o.op.encode();
            op_recs.push(OpRecord {
                code: U16::new(o.op.code() as u16),
                n_inputs: o.inputs.len() as u8,
                n_outputs: o.outputs.len() as u8,
                io_start: U32::new(op_tensors.len() as u32),
                attr_start: U32::new(attrs.len() as u32),
                attr_len: U32::new(words.as_slice().len() as u32),
                scratch: U32::new(o.scratch.unwrap_or(NO_TENSOR)),
                name_off,
                name_len,
                reserved: U32::new(0),
            });
            op_tensors.extend(o.inputs.iter().chain(&o.outputs).map(|&v| U32::new(v)));
            attrs.extend(words.as_slice().iter().map(|&v| U32::new(v)));
        }
        let mut io = Vec::new();
        for (kind, list) in [(0u32, &self.inputs), (1u32, &self.outputs)] {
            for (name, id) in list {
                let (name_off, name_len) = strings.add(name);
                io.push(IoRecord {
                    tensor: U32::new(*id),
                    kind: U32::new(kind),
                    name_off,
                    name_len,
                });
            }
        }
        let mut meta = Vec::new();
        for (k, v) in &self.meta {
            let (key_off, key_len) = strings.add(k);
            let (value_off, value_len) = strings.add(v);
            meta.push(MetaRecord {
                key_off,
                key_len,
                value_off,
                value_len,
            });
        }

        // Section offsets depend only on lengths; fix them first so constant offsets can be made
        // absolute before the tensor records are serialized.
        let lens = [
            strings.0.len(),
            tensor_recs.as_bytes().len(),
            op_recs.as_bytes().len(),
            op_tensors.as_bytes().len(),
            attrs.as_bytes().len(),
            io.as_bytes().len(),
            meta.as_bytes().len(),
            data.len(),
        ];
        let mut offsets = [0u64; 8];
        let mut offset = align_up(64 + 24 * SECTION_KINDS.len() as u64);
        for (o, &l) in offsets.iter_mut().zip(&lens) {
            *o = offset;
            offset = align_up(offset + l as u64);
        }
        let data_start = offsets[7];
        for (rec, (t, rel)) in tensor_recs
            .iter_mut()
            .zip(self.tensors.iter().zip(&const_rel))
        {
            if t.storage == Storage::Const {
                rec.offset = U64::new(data_start + rel);
            }
        }
        let counts = [
            strings.0.len(),
            tensor_recs.len(),
            op_recs.len(),
            op_tensors.len(),
            attrs.len(),
            io.len(),
            meta.len(),
            data.len(),
        ];
        let bodies: [&[u8]; 8] = [
            &strings.0,
            tensor_recs.as_bytes(),
            op_recs.as_bytes(),
            op_tensors.as_bytes(),
            attrs.as_bytes(),
            io.as_bytes(),
            meta.as_bytes(),
            &data,
        ];
        let mut out = vec![0u8; offset as usize];
        let mut table = Vec::new();
        for (i, kind) in SECTION_KINDS.iter().enumerate() {
            table.push(SectionEntry {
                kind: U32::new(*kind as u32),
                count: U32::new(counts[i] as u32),
                offset: U64::new(offsets[i]),
                len: U64::new(lens[i] as u64),
            });
            let o = offsets[i] as usize;
            out[o..o + lens[i]].copy_from_slice(bodies[i]);
        }
        let header = FileHeader {
            magic: MAGIC,
            version_major: U16::new(VERSION_MAJOR),
            version_minor: U16::new(VERSION_MINOR),
            header_len: U32::new(64),
            file_len: U64::new(out.len() as u64),
            crc32: U32::new(0),
            section_count: U32::new(table.len() as u32),
            arena_bytes: U64::new(self.arena_bytes),
            flags: U32::new(0),
            reserved: [0; 20],
        };
        out[..64].copy_from_slice(header.as_bytes());
        out[64..64 + 24 * table.len()].copy_from_slice(table.as_bytes());
        let crc = file_crc(&out);
        out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        out
    }
}
