//! The `.eta` adapter format: the trainable state applied on top of a frozen `.etm` model.
//!
//! An adapter is a list of entries, each an f32 array attached to one op: a replacement bias,
//! layer-norm gain or shift, log-multipliers of a compressed weight's group scales, the
//! centroids of its codebook, a LoRA pair, or a classifier head. The model's indices and weights
//! stay frozen in flash; only these values change during fine-tuning.
//!
//! Layout (little-endian): a 64-byte header, `entry_count` 32-byte entry records, then the f32
//! values at the next multiple of 16 bytes. The header holds the CRC-32 of everything after it
//! and binds the adapter to its model by the model's checksum and length.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{FormatError, Place};
use crate::layout::QBlockLayout;
use crate::model::Model;
use crate::ops::Op;
use crate::tensor::Encoding;

/// First eight bytes of every `.eta` file.
pub const ADAPTER_MAGIC: [u8; 8] = *b"\x89ETA\r\n\x1a\n";
/// Adapter format major version.
pub const ADAPTER_VERSION: u16 = 1;

/// The 64-byte adapter header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AdapterHeader {
    /// [`ADAPTER_MAGIC`].
    pub magic: [u8; 8],
    /// [`ADAPTER_VERSION`].
    pub version: U16,
    /// Reserved, zero.
    pub flags: U16,
    /// Entry records that follow.
    pub entry_count: U32,
    /// Checksum of the model this adapter belongs to.
    pub model_crc: U32,
    /// Length of that model file.
    pub model_len: U64,
    /// f32 values in the data part.
    pub value_count: U32,
    /// CRC-32 of the bytes after the header.
    pub crc32: U32,
    /// Reserved, zero.
    pub reserved: [u8; 28],
}

/// One trainable array.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EntryRecord {
    /// An [`EntryKind`] code.
    pub kind: u8,
    /// Reserved, zero.
    pub pad: u8,
    /// LoRA rank (LoRA entries), else 0.
    pub rank: U16,
    /// The op it applies to (execution index).
    pub op: U32,
    /// Index of the first value.
    pub offset: U32,
    /// Number of values.
    pub len: U32,
    /// Rows of the array (1 for vectors).
    pub rows: U32,
    /// Columns of the array.
    pub cols: U32,
    /// LoRA scaling numerator α (the update is `α/r · B·A·x`), as f32 bits.
    pub alpha: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// What an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// Replacement bias of a dense layer or convolution (`[N]`).
    Bias = 1,
    /// Replacement layer-norm gain (`[inner]`).
    NormGain = 2,
    /// Replacement layer-norm shift (`[inner]`).
    NormBias = 3,
    /// Log-multipliers of a block-quantized weight's group scales (`[N, groups]`): the scale used
    /// is `s · e^θ`.
    LogScale = 4,
    /// Replacement centroids of a block-quantized weight's tables (`[tables, 2^bits]`).
    Centroids = 5,
    /// LoRA down-projection `A` (`[r, K]`).
    LoraA = 6,
    /// LoRA up-projection `B` (`[N, r]`).
    LoraB = 7,
    /// Replacement f32 weight of a dense layer (`[N, K]`): a trainable classifier head.
    Head = 8,
}

impl EntryKind {
    /// Decodes a stored code.
    pub fn from_code(c: u8) -> Option<EntryKind> {
        use EntryKind::*;
        Some(match c {
            1 => Bias,
            2 => NormGain,
            3 => NormBias,
            4 => LogScale,
            5 => Centroids,
            6 => LoraA,
            7 => LoraB,
            8 => Head,
            _ => return None,
        })
    }

    /// Short name (`bias`, `lora-a`, ...).
    pub fn name(self) -> &'static str {
        use EntryKind::*;
        match self {
            Bias => "bias",
            NormGain => "norm-gain",
            NormBias => "norm-bias",
            LogScale => "log-scale",
            Centroids => "centroids",
            LoraA => "lora-a",
            LoraB => "lora-b",
            Head => "head",
        }
    }
}

/// A decoded entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    /// What it holds.
    pub kind: EntryKind,
    /// The op it applies to.
    pub op: u32,
    /// First value index.
    pub offset: u32,
    /// Value count.
    pub len: u32,
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub cols: u32,
    /// LoRA rank.
    pub rank: u16,
    /// LoRA α.
    pub alpha: f32,
}

impl Entry {
    /// The entry's values in the adapter's value array.
    pub fn range(&self) -> core::ops::Range<usize> {
        self.offset as usize..(self.offset + self.len) as usize
    }
}

/// The shape an entry of `kind` on op `op_index` must have, or an error saying why the kind does
/// not apply there.
pub fn expected_shape(
    model: &Model<'_>,
    kind: EntryKind,
    op_index: u32,
    rank: u16,
) -> Result<(u32, u32), &'static str> {
    if op_index >= model.op_count() {
        return Err("op index past the model's ops");
    }
    let op = model.op(op_index);
    let weight = |i: usize| model.tensor(op.input(i));
    let linear = matches!(op.op, Op::Dense(_) | Op::Conv(_));
    let nk = || {
        let w = weight(1);
        (w.meta.shape.dims()[0], w.meta.shape.dims()[1])
    };
    let qlayout = || -> Result<QBlockLayout, &'static str> {
        let w = weight(1);
        if w.meta.encoding != Encoding::QBlock {
            return Err("needs a block-quantized weight");
        }
        let (n, k) = nk();
        QBlockLayout::new(n as usize, k as usize, w.params).ok_or("bad layout")
    };
    match kind {
        EntryKind::Bias if linear => Ok((1, nk().0)),
        EntryKind::NormGain | EntryKind::NormBias => match op.op {
            Op::LayerNorm { axis, .. } => {
                let s = model.tensor(op.input(0)).meta.shape;
                Ok((1, s.prod(axis as usize, s.rank()) as u32))
            }
            _ => Err("applies to layer norms"),
        },
        EntryKind::LogScale if linear => qlayout().map(|l| (l.n as u32, l.groups_per_row() as u32)),
        EntryKind::Centroids if linear => qlayout().map(|l| (l.tables as u32, l.entries() as u32)),
        EntryKind::LoraA | EntryKind::LoraB if linear => {
            if let Op::Conv(c) = op.op {
                if c.groups != 1 {
                    return Err("LoRA applies to ungrouped convolutions");
                }
            }
            if rank == 0 {
                return Err("LoRA rank is zero");
            }
            let (n, k) = nk();
            Ok(if kind == EntryKind::LoraA {
                (rank as u32, k)
            } else {
                (n, rank as u32)
            })
        }
        EntryKind::Head => match op.op {
            Op::Dense(_) => Ok(nk()),
            _ => Err("a head replaces a dense layer's weight"),
        },
        _ => Err("applies to dense layers and convolutions"),
    }
}

/// A validated adapter, viewed in place.
#[derive(Clone, Copy)]
pub struct AdapterView<'a> {
    entries: &'a [EntryRecord],
    values: &'a [u8],
}

impl<'a> AdapterView<'a> {
    /// Parses an adapter and checks it against `model`: magic, version, checksum, that it was made
    /// for this model, and that every entry fits its op.
    pub fn from_bytes(bytes: &'a [u8], model: &Model<'_>) -> Result<AdapterView<'a>, FormatError> {
        let (h, rest) =
            AdapterHeader::ref_from_prefix(bytes).map_err(|_| FormatError::Truncated {
                place: Place::Header,
                needed: 64,
                available: bytes.len() as u64,
            })?;
        if h.magic != ADAPTER_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if h.version.get() != ADAPTER_VERSION {
            return Err(FormatError::UnsupportedVersion {
                major: h.version.get(),
                minor: 0,
            });
        }
        let n = h.entry_count.get() as u64;
        let values_at = (64 + n * 32).div_ceil(16) * 16;
        let need = values_at + h.value_count.get() as u64 * 4;
        if need > bytes.len() as u64 {
            return Err(FormatError::Truncated {
                place: Place::Header,
                needed: need,
                available: bytes.len() as u64,
            });
        }
        let body = &bytes[64..need as usize];
        let computed = crc32fast::hash(body);
        if computed != h.crc32.get() {
            return Err(FormatError::Checksum {
                stored: h.crc32.get(),
                computed,
            });
        }
        if h.model_crc.get() != model.checksum() || h.model_len.get() != model.file_len() {
            return Err(FormatError::BadAttribute {
                place: Place::Header,
                what: "adapter was made for another model",
            });
        }
        let entries =
            <[EntryRecord]>::ref_from_bytes(&rest[..(n * 32) as usize]).map_err(|_| {
                FormatError::Truncated {
                    place: Place::Header,
                    needed: n * 32,
                    available: rest.len() as u64,
                }
            })?;
        let view = AdapterView {
            entries,
            values: &bytes[values_at as usize..need as usize],
        };
        for i in 0..entries.len() {
            let place = Place::Meta(i as u32);
            let r = &entries[i];
            let kind = EntryKind::from_code(r.kind).ok_or(FormatError::UnknownCode {
                place,
                field: "adapter entry",
                value: r.kind as u32,
            })?;
            let (rows, cols) = expected_shape(model, kind, r.op.get(), r.rank.get())
                .map_err(|what| FormatError::BadAttribute { place, what })?;
            let (off, len) = (r.offset.get() as u64, r.len.get() as u64);
            if r.rows.get() != rows || r.cols.get() != cols || len != rows as u64 * cols as u64 {
                return Err(FormatError::BadShape {
                    place,
                    what: "adapter entry shape does not fit its op",
                });
            }
            if off + len > h.value_count.get() as u64 {
                return Err(FormatError::OutOfBounds {
                    place,
                    offset: off,
                    len,
                    limit: h.value_count.get() as u64,
                });
            }
            // One entry per (kind, op).
            if entries[..i]
                .iter()
                .any(|o| o.kind == r.kind && o.op.get() == r.op.get())
            {
                return Err(FormatError::BadAttribute {
                    place,
                    what: "two adapter entries of one kind for one op",
                });
            }
        }
        // LoRA comes in pairs of equal rank.
        for r in entries.iter().filter(|r| r.kind == EntryKind::LoraA as u8) {
            let pair = entries.iter().any(|o| {
                o.kind == EntryKind::LoraB as u8
                    && o.op.get() == r.op.get()
                    && o.rank.get() == r.rank.get()
            });
            if !pair {
                return Err(FormatError::BadAttribute {
                    place: Place::Op(r.op.get()),
                    what: "LoRA A without a matching B",
                });
            }
        }
        Ok(view)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entry `i`.
    pub fn entry(&self, i: usize) -> Entry {
        let r = &self.entries[i];
        Entry {
            kind: EntryKind::from_code(r.kind).expect("validated"),
            op: r.op.get(),
            offset: r.offset.get(),
            len: r.len.get(),
            rows: r.rows.get(),
            cols: r.cols.get(),
            rank: r.rank.get(),
            alpha: f32::from_bits(r.alpha.get()),
        }
    }

    /// Value `i` of the data part.
    pub fn value(&self, i: usize) -> f32 {
        f32::from_le_bytes(self.values[i * 4..i * 4 + 4].try_into().unwrap())
    }

    /// Number of values.
    pub fn value_count(&self) -> usize {
        self.values.len() / 4
    }
}

/// Serialises an adapter (host side and devices that save one).
///
/// `entries` give kind, op, shape, rank and α; their `offset`/`len` index `values`.
pub fn write_adapter<'o>(
    entries: &[Entry],
    values: &[f32],
    model: &Model<'_>,
    out: &'o mut [u8],
) -> Result<&'o [u8], FormatError> {
    let values_at = (64 + entries.len() * 32).div_ceil(16) * 16;
    let total = values_at + values.len() * 4;
    if out.len() < total {
        return Err(FormatError::Truncated {
            place: Place::Header,
            needed: total as u64,
            available: out.len() as u64,
        });
    }
    let out = &mut out[..total];
    out.iter_mut().for_each(|b| *b = 0);
    for (i, e) in entries.iter().enumerate() {
        let r = EntryRecord {
            kind: e.kind as u8,
            pad: 0,
            rank: U16::new(e.rank),
            op: U32::new(e.op),
            offset: U32::new(e.offset),
            len: U32::new(e.len),
            rows: U32::new(e.rows),
            cols: U32::new(e.cols),
            alpha: U32::new(e.alpha.to_bits()),
            reserved: U32::new(0),
        };
        out[64 + i * 32..64 + (i + 1) * 32].copy_from_slice(r.as_bytes());
    }
    for (i, v) in values.iter().enumerate() {
        out[values_at + i * 4..values_at + i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    let crc = crc32fast::hash(&out[64..]);
    let h = AdapterHeader {
        magic: ADAPTER_MAGIC,
        version: U16::new(ADAPTER_VERSION),
        flags: U16::new(0),
        entry_count: U32::new(entries.len() as u32),
        model_crc: U32::new(model.checksum()),
        model_len: U64::new(model.file_len()),
        value_count: U32::new(values.len() as u32),
        crc32: U32::new(crc),
        reserved: [0; 28],
    };
    out[..64].copy_from_slice(h.as_bytes());
    Ok(out)
}

/// Bytes [`write_adapter`] needs.
pub fn adapter_len(entries: usize, values: usize) -> usize {
    (64 + entries * 32).div_ceil(16) * 16 + values * 4
}
