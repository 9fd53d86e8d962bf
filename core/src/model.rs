//! The validated, zero-copy view of a `.etm` file.

use zerocopy::little_endian::U32;
use zerocopy::FromBytes;

use crate::error::{FormatError, Place, SectionProblem};
use crate::format::*;
use crate::ops::{check, scratch_bytes, Op, Storage, TensorMeta};
use crate::tensor::{encoded_len, DType, Encoding, Shape, MAX_RANK};

/// A model checked down to the last byte, used in place.
///
/// Once [`Model::from_bytes`] returns `Ok`, every offset, shape, op arity, attribute and arena
/// placement has been checked, so the runtime can index without further checks.
///
/// ```
/// # fn demo(bytes: &[u8]) -> Result<(), edgetune_core::FormatError> {
/// let model = edgetune_core::Model::from_bytes(bytes)?;
/// println!("{} ops, arena {} bytes", model.op_count(), model.arena_bytes());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy)]
pub struct Model<'a> {
    bytes: &'a [u8],
    header: &'a FileHeader,
    strings: &'a [u8],
    tensors: &'a [TensorRecord],
    ops: &'a [OpRecord],
    op_tensors: &'a [U32],
    attrs: &'a [U32],
    io: &'a [IoRecord],
    meta: &'a [MetaRecord],
    data: (u64, u64),
}

/// A tensor of a validated model.
#[derive(Debug, Clone, Copy)]
pub struct TensorInfo<'a> {
    /// Tensor id (index in the tensor table).
    pub id: u32,
    /// Name from the source graph.
    pub name: &'a str,
    /// Type, encoding, shape and storage.
    pub meta: TensorMeta,
    /// Const: file offset. Arena: arena offset.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Encoding parameters.
    pub params: [u32; 4],
    /// Live range in time steps (arena tensors).
    pub live: (u32, u32),
    /// The tensor whose bytes this one reuses under another shape, if it is an alias.
    pub alias_of: Option<u32>,
}

/// An op of a validated model.
#[derive(Debug, Clone, Copy)]
pub struct OpInfo<'a> {
    /// Position in execution order.
    pub index: u32,
    /// The decoded op.
    pub op: Op,
    /// Name of the source node.
    pub name: &'a str,
    inputs: &'a [U32],
    outputs: &'a [U32],
    /// Scratch tensor id, if the op uses one.
    pub scratch: Option<u32>,
}

impl<'a> OpInfo<'a> {
    /// Number of inputs.
    pub fn n_inputs(&self) -> usize {
        self.inputs.len()
    }
    /// Input tensor id `i`.
    pub fn input(&self, i: usize) -> u32 {
        self.inputs[i].get()
    }
    /// Input tensor ids.
    pub fn inputs(&self) -> impl Iterator<Item = u32> + 'a {
        self.inputs.iter().map(|v| v.get())
    }
    /// Output tensor id `i`.
    pub fn output(&self, i: usize) -> u32 {
        self.outputs[i].get()
    }
    /// Output tensor ids.
    pub fn outputs(&self) -> impl Iterator<Item = u32> + 'a {
        self.outputs.iter().map(|v| v.get())
    }
}

/// A graph input or output.
#[derive(Debug, Clone, Copy)]
pub struct IoInfo<'a> {
    /// Name users pass inputs by.
    pub name: &'a str,
    /// The tensor.
    pub tensor: u32,
}

fn slice_of<'a, T: FromBytes + zerocopy::Immutable + zerocopy::KnownLayout>(
    bytes: &'a [u8],
    place: Place,
) -> Result<&'a [T], FormatError> {
    <[T]>::ref_from_bytes(bytes).map_err(|_| FormatError::Section {
        kind: match place {
            Place::Section(k) => k,
            _ => 0,
        },
        problem: SectionProblem::RaggedLength,
    })
}

fn get_str<'a>(
    strings: &'a [u8],
    off: u32,
    len: u32,
    place: Place,
) -> Result<&'a str, FormatError> {
    let (o, l) = (off as u64, len as u64);
    let end = o
        .checked_add(l)
        .filter(|&e| e <= strings.len() as u64)
        .ok_or(FormatError::OutOfBounds {
            place,
            offset: o,
            len: l,
            limit: strings.len() as u64,
        })?;
    core::str::from_utf8(&strings[o as usize..end as usize])
        .map_err(|_| FormatError::BadString { place })
}

impl<'a> Model<'a> {
    /// Views bytes that already passed [`Model::from_bytes`], skipping the checksum and the
    /// validation (a host running the same model many times pays for them once).
    ///
    /// # Safety
    /// `bytes` must be byte-for-byte a buffer for which `from_bytes` returned `Ok`, at an address
    /// with the same alignment guarantee; kernels index without checks on that promise.
    pub unsafe fn from_validated_bytes(bytes: &'a [u8]) -> Model<'a> {
        Self::parse(bytes).expect("bytes were validated before")
    }

    /// Parses and fully validates a model.
    ///
    /// `bytes` must start at an address aligned to [`BUFFER_ALIGN`] (8) so weights can be used in
    /// place; it may extend past the file (a flash partition), the header says where the file ends.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Model<'a>, FormatError> {
        if bytes.as_ptr() as usize % BUFFER_ALIGN != 0 {
            return Err(FormatError::MisalignedBuffer {
                required: BUFFER_ALIGN as u32,
            });
        }
        let (header, _) =
            FileHeader::ref_from_prefix(bytes).map_err(|_| FormatError::Truncated {
                place: Place::Header,
                needed: 64,
                available: bytes.len() as u64,
            })?;
        if header.magic != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let (major, minor) = (header.version_major.get(), header.version_minor.get());
        if major != VERSION_MAJOR || header.header_len.get() != 64 {
            return Err(FormatError::UnsupportedVersion { major, minor });
        }
        let file_len = header.file_len.get();
        if file_len > bytes.len() as u64 || file_len < 64 {
            return Err(FormatError::Truncated {
                place: Place::Header,
                needed: file_len,
                available: bytes.len() as u64,
            });
        }
        let bytes = &bytes[..file_len as usize];
        let computed = file_crc(bytes);
        if computed != header.crc32.get() {
            return Err(FormatError::Checksum {
                stored: header.crc32.get(),
                computed,
            });
        }
        let model = Self::parse(bytes)?;
        model.validate()?;
        Ok(model)
    }

    /// Locates the sections of a file whose header, length and checksum were checked.
    fn parse(bytes: &'a [u8]) -> Result<Model<'a>, FormatError> {
        let (header, _) =
            FileHeader::ref_from_prefix(bytes).map_err(|_| FormatError::Truncated {
                place: Place::Header,
                needed: 64,
                available: bytes.len() as u64,
            })?;
        let file_len = header.file_len.get().min(bytes.len() as u64);
        let bytes = &bytes[..file_len as usize];
        let n_sections = header.section_count.get() as u64;
        let table_len = n_sections.saturating_mul(24);
        if 64 + table_len > file_len {
            return Err(FormatError::Truncated {
                place: Place::Header,
                needed: 64 + table_len,
                available: file_len,
            });
        }
        let table = <[SectionEntry]>::ref_from_bytes(&bytes[64..(64 + table_len) as usize])
            .map_err(|_| FormatError::Truncated {
                place: Place::Header,
                needed: table_len,
                available: 0,
            })?;
        let mut found: [Option<(u64, u64)>; 9] = [None; 9];
        for (i, s) in table.iter().enumerate() {
            let place = Place::Section(i as u32);
            let (off, len) = (s.offset.get(), s.len.get());
            if off.checked_add(len).is_none_or(|e| e > file_len) {
                return Err(FormatError::OutOfBounds {
                    place,
                    offset: off,
                    len,
                    limit: file_len,
                });
            }
            if off % ALIGN != 0 {
                return Err(FormatError::Misaligned {
                    place,
                    offset: off,
                    required: ALIGN as u32,
                });
            }
            let kind = s.kind.get();
            if (1..=8).contains(&kind) {
                if found[kind as usize].is_some() {
                    return Err(FormatError::Section {
                        kind,
                        problem: SectionProblem::Duplicate,
                    });
                }
                found[kind as usize] = Some((off, len));
            }
            // Unknown kinds come from newer minor versions and are skipped.
        }
        let section = |k: SectionKind| -> Result<&'a [u8], FormatError> {
            let (o, l) = found[k as usize].ok_or(FormatError::Section {
                kind: k as u32,
                problem: SectionProblem::Missing,
            })?;
            Ok(&bytes[o as usize..(o + l) as usize])
        };
        let sec_place = |k: SectionKind| Place::Section(k as u32);
        let strings = section(SectionKind::Strings)?;
        let model = Model {
            bytes,
            header,
            strings,
            tensors: slice_of(
                section(SectionKind::Tensors)?,
                sec_place(SectionKind::Tensors),
            )?,
            ops: slice_of(section(SectionKind::Ops)?, sec_place(SectionKind::Ops))?,
            op_tensors: slice_of(
                section(SectionKind::OpTensors)?,
                sec_place(SectionKind::OpTensors),
            )?,
            attrs: slice_of(section(SectionKind::Attrs)?, sec_place(SectionKind::Attrs))?,
            io: slice_of(
                section(SectionKind::GraphIo)?,
                sec_place(SectionKind::GraphIo),
            )?,
            meta: slice_of(section(SectionKind::Meta)?, sec_place(SectionKind::Meta))?,
            data: found[SectionKind::Data as usize].ok_or(FormatError::Section {
                kind: SectionKind::Data as u32,
                problem: SectionProblem::Missing,
            })?,
        };
        Ok(model)
    }

    fn validate(&self) -> Result<(), FormatError> {
        let n_ops = self.ops.len() as u32;
        if self.tensors.len() >= NO_TENSOR as usize || n_ops >= u32::MAX - 2 {
            return Err(FormatError::BadShape {
                place: Place::Header,
                what: "too many tensors or ops",
            });
        }
        for i in 0..self.tensors.len() as u32 {
            self.check_tensor(i)?;
        }
        for (i, m) in self.meta.iter().enumerate() {
            let place = Place::Meta(i as u32);
            get_str(self.strings, m.key_off.get(), m.key_len.get(), place)?;
            get_str(self.strings, m.value_off.get(), m.value_len.get(), place)?;
        }
        // Graph inputs and outputs.
        let mut n_outputs = 0;
        for (i, r) in self.io.iter().enumerate() {
            let place = Place::GraphIo(i as u32);
            get_str(self.strings, r.name_off.get(), r.name_len.get(), place)?;
            let t = self.tensor_checked(r.tensor.get(), place)?;
            if t.storage != storage::ARENA {
                return Err(FormatError::BadDType {
                    place,
                    what: "graph inputs and outputs live in the arena",
                });
            }
            match r.kind.get() {
                0 => {
                    if t.live_first.get() != 0 || t.flags.get() != 0 {
                        return Err(FormatError::BadAttribute {
                            place,
                            what: "graph input not live from the start",
                        });
                    }
                }
                1 => {
                    n_outputs += 1;
                    if t.live_last.get() != n_ops + 1 {
                        return Err(FormatError::BadAttribute {
                            place,
                            what: "graph output not live to the end",
                        });
                    }
                }
                v => {
                    return Err(FormatError::UnknownCode {
                        place,
                        field: "graph io kind",
                        value: v,
                    })
                }
            }
        }
        if n_outputs == 0 {
            return Err(FormatError::Section {
                kind: SectionKind::GraphIo as u32,
                problem: SectionProblem::Missing,
            });
        }
        // Ops: structure, types, shapes, and live ranges of what they touch.
        for i in 0..n_ops {
            self.check_op(i)?;
        }
        // Every arena tensor is defined where its live range starts.
        for (id, t) in self.tensors.iter().enumerate() {
            // An alias shares its root's bytes and live range, checked with the root.
            if t.storage != storage::ARENA || t.flags.get() != 0 {
                continue;
            }
            let id = id as u32;
            let place = Place::Tensor(id);
            let first = t.live_first.get();
            let defined = if first == 0 {
                self.io
                    .iter()
                    .any(|r| r.kind.get() == 0 && r.tensor.get() == id)
            } else if first <= n_ops {
                let op = self.op(first - 1);
                op.outputs().any(|o| o == id) || op.scratch == Some(id)
            } else {
                false
            };
            if !defined || t.live_last.get() < first || t.live_last.get() > n_ops + 1 {
                return Err(FormatError::UseBeforeDefinition { place, tensor: id });
            }
        }
        // No two tensors live at the same time share bytes.
        let arena = self.arena_bytes();
        for (a, ta) in self.tensors.iter().enumerate() {
            if ta.storage == storage::ARENA
                && ta
                    .offset
                    .get()
                    .checked_add(ta.len.get())
                    .is_none_or(|e| e > arena)
            {
                return Err(FormatError::ArenaOverlap {
                    a: a as u32,
                    b: a as u32,
                });
            }
        }
        // Quadratic in arena tensors; models have hundreds to a few thousand.
        for (a, ta) in self.tensors.iter().enumerate() {
            if ta.storage != storage::ARENA || ta.flags.get() != 0 {
                continue;
            }
            let (ao, al) = (ta.offset.get(), ta.len.get());
            for (b, tb) in self.tensors.iter().enumerate().skip(a + 1) {
                if tb.storage != storage::ARENA || tb.flags.get() != 0 {
                    continue;
                }
                let time = ta.live_first.get() <= tb.live_last.get()
                    && tb.live_first.get() <= ta.live_last.get();
                let (bo, bl) = (tb.offset.get(), tb.len.get());
                if time && ao < bo + bl && bo < ao + al {
                    return Err(FormatError::ArenaOverlap {
                        a: a as u32,
                        b: b as u32,
                    });
                }
            }
        }
        Ok(())
    }

    fn tensor_checked(&self, id: u32, place: Place) -> Result<&'a TensorRecord, FormatError> {
        self.tensors
            .get(id as usize)
            .ok_or(FormatError::BadTensorId { place, id })
    }

    fn check_tensor(&self, id: u32) -> Result<(), FormatError> {
        let t = &self.tensors[id as usize];
        let place = Place::Tensor(id);
        get_str(self.strings, t.name_off.get(), t.name_len.get(), place)?;
        let meta = self.meta_of(t, place)?;
        if meta.shape.dims().contains(&0) {
            return Err(FormatError::BadShape {
                place,
                what: "zero-sized dimension",
            });
        }
        // Arena tensors carry no encoding parameters (an alias keeps its owner's id there).
        let params = if meta.storage == Storage::Const {
            t.params.map(|p| p.get())
        } else {
            [0; 4]
        };
        let expect = encoded_len(meta.dtype, meta.encoding, &meta.shape, params).ok_or(
            FormatError::BadShape {
                place,
                what: "encoding does not fit dtype and shape",
            },
        )?;
        // Element and byte counts must fit this target's address space (kernels index with usize).
        if expect > isize::MAX as u64
            || meta
                .shape
                .checked_numel()
                .is_none_or(|n| n > isize::MAX as u64)
        {
            return Err(FormatError::BadShape {
                place,
                what: "tensor too large for this target",
            });
        }
        let (off, len) = (t.offset.get(), t.len.get());
        if len != expect {
            return Err(FormatError::BadShape {
                place,
                what: "byte length does not match shape and encoding",
            });
        }
        match meta.storage {
            Storage::Const => {
                let (d0, dl) = self.data;
                if off < d0 || off.checked_add(len).is_none_or(|e| e > d0 + dl) {
                    return Err(FormatError::OutOfBounds {
                        place,
                        offset: off,
                        len,
                        limit: d0 + dl,
                    });
                }
                if off % ALIGN != 0 {
                    return Err(FormatError::Misaligned {
                        place,
                        offset: off,
                        required: ALIGN as u32,
                    });
                }
            }
            Storage::Arena => {
                if meta.encoding != Encoding::Plain {
                    return Err(FormatError::BadDType {
                        place,
                        what: "arena tensors are plain",
                    });
                }
                if off % 16 != 0 {
                    return Err(FormatError::Misaligned {
                        place,
                        offset: off,
                        required: 16,
                    });
                }
            }
        }
        match t.flags.get() {
            0 => {}
            FLAG_ALIAS => {
                let root_id = t.params[0].get();
                let root = self.tensor_checked(root_id, place)?;
                let same = root.flags.get() == 0
                    && root.storage == storage::ARENA
                    && t.storage == storage::ARENA
                    && root.dtype == t.dtype
                    && root.offset.get() == off
                    && root.len.get() == len
                    && root.live_first.get() == t.live_first.get()
                    && root.live_last.get() == t.live_last.get();
                if !same {
                    return Err(FormatError::BadAttribute {
                        place,
                        what: "alias differs from the tensor it reuses",
                    });
                }
            }
            v => {
                return Err(FormatError::UnknownCode {
                    place,
                    field: "tensor flags",
                    value: v,
                })
            }
        }
        Ok(())
    }

    fn meta_of(&self, t: &TensorRecord, place: Place) -> Result<TensorMeta, FormatError> {
        let dtype = DType::from_code(t.dtype).ok_or(FormatError::UnknownCode {
            place,
            field: "dtype",
            value: t.dtype as u32,
        })?;
        let encoding = Encoding::from_code(t.encoding).ok_or(FormatError::UnknownCode {
            place,
            field: "encoding",
            value: t.encoding as u32,
        })?;
        let mut dims = [0u32; MAX_RANK];
        for (d, s) in dims.iter_mut().zip(&t.dims) {
            *d = s.get();
        }
        let shape = Shape::from_stored(t.rank, dims).ok_or(FormatError::BadShape {
            place,
            what: "rank above 6",
        })?;
        let storage = match t.storage {
            storage::CONST => Storage::Const,
            storage::ARENA => Storage::Arena,
            v => {
                return Err(FormatError::UnknownCode {
                    place,
                    field: "storage",
                    value: v as u32,
                })
            }
        };
        let params = if t.storage == storage::CONST {
            t.params.map(|p| p.get())
        } else {
            [0; 4]
        };
        Ok(TensorMeta {
            params,
            dtype,
            encoding,
            shape,
            storage,
        })
    }

    fn check_op(&self, i: u32) -> Result<(), FormatError> {
        let r = &self.ops[i as usize];
        let place = Place::Op(i);
        get_str(self.strings, r.name_off.get(), r.name_len.get(), place)?;
        let (ni, no) = (r.n_inputs as usize, r.n_outputs as usize);
        if ni > MAX_OP_INPUTS {
            return Err(FormatError::Arity {
                place,
                expected: "at most 32 inputs",
                found: ni as u32,
            });
        }
        let io_start = r.io_start.get() as u64;
        if io_start + (ni + no) as u64 > self.op_tensors.len() as u64 {
            return Err(FormatError::OutOfBounds {
                place,
                offset: io_start,
                len: (ni + no) as u64,
                limit: self.op_tensors.len() as u64,
            });
        }
        let (a0, al) = (r.attr_start.get() as u64, r.attr_len.get() as u64);
        if a0 + al > self.attrs.len() as u64 {
            return Err(FormatError::OutOfBounds {
                place,
                offset: a0,
                len: al,
                limit: self.attrs.len() as u64,
            });
        }
        let mut words = [0u32; crate::ops::MAX_ATTR_WORDS];
        if al as usize > words.len() {
            return Err(FormatError::BadAttribute {
                place,
                what: "too many attribute words",
            });
        }
        for (w, s) in words
            .iter_mut()
            .zip(&self.attrs[a0 as usize..(a0 + al) as usize])
        {
            *w = s.get();
        }
        let op = Op::decode(r.code.get(), &words[..al as usize], place)?;
        let ids = &self.op_tensors[io_start as usize..io_start as usize + ni + no];
        let blank = TensorMeta {
            params: [0; 4],
            dtype: DType::F32,
            encoding: Encoding::Plain,
            shape: Shape::scalar(),
            storage: Storage::Const,
        };
        let mut metas = [blank; MAX_OP_INPUTS + 1];
        let t_now = i + 1;
        for (k, id) in ids.iter().enumerate() {
            let id = id.get();
            let t = self.tensor_checked(id, place)?;
            metas[k.min(MAX_OP_INPUTS)] = self.meta_of(t, Place::Tensor(id))?;
            if t.storage == storage::ARENA {
                let (first, last) = (t.live_first.get(), t.live_last.get());
                let ok = if k < ni {
                    first < t_now && last >= t_now
                } else {
                    first == t_now && last >= t_now
                };
                if !ok {
                    return Err(FormatError::UseBeforeDefinition { place, tensor: id });
                }
            } else if k >= ni {
                return Err(FormatError::BadDType {
                    place,
                    what: "an op writes a constant",
                });
            }
            if k >= ni && t.flags.get() != 0 {
                return Err(FormatError::BadAttribute {
                    place,
                    what: "an op writes an alias",
                });
            }
            if k >= ni && no == 1 {
                metas[MAX_OP_INPUTS] = metas[k.min(MAX_OP_INPUTS)];
            }
        }
        let outputs: &[TensorMeta] = if no == 1 {
            core::slice::from_ref(&metas[MAX_OP_INPUTS])
        } else {
            &[]
        };
        check(&op, &metas[..ni], outputs, place)?;
        let need = scratch_bytes(&op, &metas[..ni]);
        let scratch = r.scratch.get();
        if need == 0 {
            if scratch != NO_TENSOR {
                return Err(FormatError::BadAttribute {
                    place,
                    what: "scratch given to an op that needs none",
                });
            }
        } else {
            let t = self.tensor_checked(scratch, place)?;
            let ok = !ids.iter().any(|id| id.get() == scratch)
                && t.storage == storage::ARENA
                && t.flags.get() == 0
                && t.len.get() >= need
                && t.dtype == DType::F32 as u8
                && t.live_first.get() == t_now
                && t.live_last.get() == t_now;
            if !ok {
                return Err(FormatError::BadAttribute {
                    place,
                    what: "scratch tensor missing, too small or not private",
                });
            }
        }
        Ok(())
    }

    /// The file bytes (up to the header's length).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Bytes of activation arena a session needs.
    pub fn arena_bytes(&self) -> u64 {
        self.header.arena_bytes.get()
    }

    /// Size of the file.
    pub fn file_len(&self) -> u64 {
        self.header.file_len.get()
    }

    /// CRC-32 stored in the header: identifies the model (adapters are tied to it).
    pub fn checksum(&self) -> u32 {
        self.header.crc32.get()
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> u32 {
        self.tensors.len() as u32
    }

    /// Tensor `id` (panics if out of range).
    pub fn tensor(&self, id: u32) -> TensorInfo<'a> {
        let t = &self.tensors[id as usize];
        let place = Place::Tensor(id);
        // Validated at load: these cannot fail.
        let meta = self.meta_of(t, place).expect("validated");
        let name = get_str(self.strings, t.name_off.get(), t.name_len.get(), place).unwrap_or("");
        let mut params = [0u32; 4];
        for (p, s) in params.iter_mut().zip(&t.params) {
            *p = s.get();
        }
        TensorInfo {
            id,
            name,
            meta,
            offset: t.offset.get(),
            len: t.len.get(),
            params,
            live: (t.live_first.get(), t.live_last.get()),
            alias_of: (t.flags.get() & FLAG_ALIAS != 0).then(|| t.params[0].get()),
        }
    }

    /// The bytes of a constant tensor (empty for an arena tensor).
    pub fn const_bytes(&self, id: u32) -> &'a [u8] {
        let t = &self.tensors[id as usize];
        if t.storage != storage::CONST {
            return &[];
        }
        let (o, l) = (t.offset.get() as usize, t.len.get() as usize);
        &self.bytes[o..o + l]
    }

    /// Number of ops.
    pub fn op_count(&self) -> u32 {
        self.ops.len() as u32
    }

    /// Op `i` in execution order (panics if out of range).
    pub fn op(&self, i: u32) -> OpInfo<'a> {
        let r = &self.ops[i as usize];
        let place = Place::Op(i);
        let (a0, al) = (r.attr_start.get() as usize, r.attr_len.get() as usize);
        let mut words = [0u32; crate::ops::MAX_ATTR_WORDS];
        for (w, s) in words.iter_mut().zip(&self.attrs[a0..a0 + al]) {
            *w = s.get();
        }
        let op = Op::decode(r.code.get(), &words[..al], place).expect("validated");
        let io0 = r.io_start.get() as usize;
        let ni = r.n_inputs as usize;
        let no = r.n_outputs as usize;
        let scratch = r.scratch.get();
        OpInfo {
            index: i,
            op,
            name: get_str(self.strings, r.name_off.get(), r.name_len.get(), place).unwrap_or(""),
            inputs: &self.op_tensors[io0..io0 + ni],
            outputs: &self.op_tensors[io0 + ni..io0 + ni + no],
            scratch: (scratch != NO_TENSOR).then_some(scratch),
        }
    }

    /// All ops in execution order.
    pub fn ops(&self) -> impl Iterator<Item = OpInfo<'a>> + '_ {
        (0..self.op_count()).map(|i| self.op(i))
    }

    fn io_of(&self, kind: u32) -> impl Iterator<Item = IoInfo<'a>> + '_ {
        let strings = self.strings;
        self.io
            .iter()
            .filter(move |r| r.kind.get() == kind)
            .map(move |r| IoInfo {
                name: get_str(strings, r.name_off.get(), r.name_len.get(), Place::Header)
                    .unwrap_or(""),
                tensor: r.tensor.get(),
            })
    }

    /// Graph inputs in declaration order.
    pub fn inputs(&self) -> impl Iterator<Item = IoInfo<'a>> + '_ {
        self.io_of(0)
    }

    /// Graph outputs in declaration order.
    pub fn outputs(&self) -> impl Iterator<Item = IoInfo<'a>> + '_ {
        self.io_of(1)
    }

    /// Graph input `i`.
    pub fn input(&self, i: usize) -> Option<IoInfo<'a>> {
        self.inputs().nth(i)
    }

    /// Graph output `i`.
    pub fn output(&self, i: usize) -> Option<IoInfo<'a>> {
        self.outputs().nth(i)
    }

    /// Metadata value for `key`.
    pub fn meta(&self, key: &str) -> Option<&'a str> {
        self.meta_entries().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// All metadata entries.
    pub fn meta_entries(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        let s = self.strings;
        self.meta.iter().map(move |m| {
            (
                get_str(s, m.key_off.get(), m.key_len.get(), Place::Header).unwrap_or(""),
                get_str(s, m.value_off.get(), m.value_len.get(), Place::Header).unwrap_or(""),
            )
        })
    }
}
