//! A session: one model, one arena, inputs in, outputs out.

use edgetune_core::{DType, Model, Storage};

use crate::adapter::Adapter;
use crate::error::RunError;
use crate::exec;
use crate::kernels::Kernels;

/// Element types a caller can read and write.
pub trait Elem: Copy + Default + 'static {
    /// The matching tensor type.
    const DTYPE: DType;
}
impl Elem for f32 {
    const DTYPE: DType = DType::F32;
}
impl Elem for i64 {
    const DTYPE: DType = DType::I64;
}
impl Elem for i32 {
    const DTYPE: DType = DType::I32;
}
impl Elem for u8 {
    const DTYPE: DType = DType::U8;
}

/// Alignment a session's arena must have.
pub const ARENA_ALIGN: usize = 16;

/// Runs one model in a caller-provided arena. No allocation, no copies of weights.
///
/// ```no_run
/// # fn demo(model_bytes: &[u8], image: &[f32]) -> Result<(), Box<dyn std::error::Error>> {
/// use edgetune_runtime::{Model, Session};
/// let model = Model::from_bytes(model_bytes)?;
/// // 16-byte aligned arena of the size the model's plan asks for.
/// let mut words = vec![0u128; (model.arena_bytes() as usize).div_ceil(16)];
/// let arena = unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 16) };
/// let mut session = Session::new(&model, arena)?;
/// session.set_input(0, image)?;
/// session.run()?;
/// let logits: &[f32] = session.output(0)?;
/// # Ok(()) }
/// ```
pub struct Session<'m, 'a> {
    model: Model<'m>,
    arena: &'a mut [u8],
    kernels: Kernels,
}

impl<'m, 'a> Session<'m, 'a> {
    /// A session with the fastest kernels for this CPU.
    pub fn new(model: &Model<'m>, arena: &'a mut [u8]) -> Result<Self, RunError> {
        Self::with_kernels(model, arena, Kernels::best())
    }

    /// A session with chosen kernels ([`Kernels::reference`] gives bit-identical results on every
    /// target).
    pub fn with_kernels(
        model: &Model<'m>,
        arena: &'a mut [u8],
        kernels: Kernels,
    ) -> Result<Self, RunError> {
        let needed = model.arena_bytes();
        if (arena.len() as u64) < needed {
            return Err(RunError::ArenaTooSmall {
                needed,
                given: arena.len() as u64,
            });
        }
        if arena.as_ptr() as usize % ARENA_ALIGN != 0 {
            return Err(RunError::ArenaMisaligned);
        }
        Ok(Session {
            model: *model,
            arena,
            kernels,
        })
    }

    /// The model.
    pub fn model(&self) -> &Model<'m> {
        &self.model
    }

    /// The kernels in use.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Index of the graph input called `name`.
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.model.inputs().position(|io| io.name == name)
    }

    fn io_tensor(&self, index: usize, output: bool) -> Result<u32, RunError> {
        let io = if output {
            self.model.output(index)
        } else {
            self.model.input(index)
        };
        io.map(|io| io.tensor)
            .ok_or(RunError::NoSuchTensor { index })
    }

    fn check_elem<T: Elem>(&self, index: usize, id: u32) -> Result<usize, RunError> {
        let meta = self.model.tensor(id).meta;
        let ok = meta.dtype == T::DTYPE || (meta.dtype == DType::Bool && T::DTYPE == DType::U8);
        if !ok {
            return Err(RunError::WrongDType {
                index,
                expected: meta.dtype,
            });
        }
        Ok(meta.shape.numel())
    }

    /// Mutable view of graph input `index`, to fill in place.
    pub fn input_mut<T: Elem>(&mut self, index: usize) -> Result<&mut [T], RunError> {
        let id = self.io_tensor(index, false)?;
        self.check_elem::<T>(index, id)?;
        // SAFETY: the id is an arena tensor of type T (checked above) inside the arena
        // (validated), and `&mut self` makes this the only view.
        Ok(unsafe { exec::arena_slice_mut::<T>(&self.model, self.arena.as_mut_ptr(), id) })
    }

    /// Copies `data` into graph input `index`.
    pub fn set_input<T: Elem>(&mut self, index: usize, data: &[T]) -> Result<(), RunError> {
        let id = self.io_tensor(index, false)?;
        let n = self.check_elem::<T>(index, id)?;
        if data.len() != n {
            return Err(RunError::WrongLength {
                index,
                expected: n,
                found: data.len(),
            });
        }
        self.input_mut::<T>(index)?.copy_from_slice(data);
        Ok(())
    }

    /// Graph output `index` after [`Session::run`].
    pub fn output<T: Elem>(&self, index: usize) -> Result<&[T], RunError> {
        let id = self.io_tensor(index, true)?;
        self.check_elem::<T>(index, id)?;
        // SAFETY: as in `input_mut`; shared borrow of self.
        Ok(unsafe { exec::arena_slice::<T>(&self.model, self.arena.as_ptr(), id) })
    }

    /// Any f32 tensor by id: an arena tensor as of the last op that wrote it, or a constant.
    /// Used by calibration to observe activations.
    pub fn tensor_f32(&self, id: u32) -> Option<&[f32]> {
        let t = self.model.tensor(id);
        if t.meta.dtype != DType::F32 || t.meta.encoding != edgetune_core::Encoding::Plain {
            return None;
        }
        Some(match t.meta.storage {
            Storage::Const => exec::const_slice::<f32>(&self.model, id),
            // SAFETY: validated arena tensor of f32; shared borrow of self.
            Storage::Arena => unsafe {
                exec::arena_slice::<f32>(&self.model, self.arena.as_ptr(), id)
            },
        })
    }

    /// Runs every op in order.
    pub fn run(&mut self) -> Result<(), RunError> {
        self.run_observed(|_, _| {})
    }

    /// Runs every op with an adapter's trainable values applied on top of the model.
    pub fn run_with(&mut self, adapter: Option<&mut Adapter<'_>>) -> Result<(), RunError> {
        self.run_range(0..self.model.op_count(), adapter)
    }

    /// Runs ops `ops.start..ops.end` only. Starting past 0 re-runs a tail on the results the ops
    /// before it left (prefix caching): the model must have been planned for it (its
    /// `resumable_from` metadata at or before `ops.start`), else this is an error.
    pub fn run_range(
        &mut self,
        ops: core::ops::Range<u32>,
        mut adapter: Option<&mut Adapter<'_>>,
    ) -> Result<(), RunError> {
        let end = ops.end.min(self.model.op_count());
        if ops.start > 0 {
            let from = self
                .model
                .meta("resumable_from")
                .and_then(|v| v.parse::<u32>().ok());
            if from.is_none_or(|f| f > ops.start) {
                return Err(RunError::NotResumable { op: ops.start });
            }
        }
        let mut parts = adapter.as_deref_mut().map(|a| a.parts());
        for i in ops.start..end {
            let op = self.model.op(i);
            exec::run_op(
                &self.model,
                self.arena.as_mut_ptr(),
                &self.kernels,
                &op,
                parts.as_mut(),
            )?;
        }
        Ok(())
    }

    /// Runs every op in order, calling `after(op_index, session)` after each one so a caller can
    /// read the op's inputs and outputs (calibration statistics, debugging).
    pub fn run_observed(
        &mut self,
        mut after: impl FnMut(u32, &Session<'m, 'a>),
    ) -> Result<(), RunError> {
        for i in 0..self.model.op_count() {
            let op = self.model.op(i);
            exec::run_op(
                &self.model,
                self.arena.as_mut_ptr(),
                &self.kernels,
                &op,
                None,
            )?;
            after(i, self);
        }
        Ok(())
    }
}
