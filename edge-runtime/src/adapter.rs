//! The adapter in RAM: trainable values applied on top of the frozen model at run time.
//!
//! The entry table is small and fixed-size; the values and a workspace (for LoRA intermediates)
//! are caller-provided buffers, so a device sizes them statically.

use edgetune_core::adapter::{adapter_len, expected_shape, write_adapter, AdapterView};
/// The `.eta` entry types, re-exported so firmware needs only this crate.
pub use edgetune_core::adapter::{Entry, EntryKind};
use edgetune_core::{FormatError, Model, Op};

/// Most entries an adapter holds.
pub const MAX_ENTRIES: usize = 64;

/// Trainable state: entries (what each array is) and the values themselves.
///
/// ```
/// use edgetune_runtime::adapter::Adapter;
/// let mut values = [0.0f32; 0];
/// let mut workspace = [0.0f32; 0];
/// let adapter = Adapter::empty(&mut values, &mut workspace);
/// assert_eq!(adapter.entries().len(), 0);
/// ```
pub struct Adapter<'b> {
    entries: heapless::Vec<Entry, MAX_ENTRIES>,
    values: &'b mut [f32],
    used: usize,
    workspace: &'b mut [f32],
}

/// Why an adapter could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterError {
    /// The file is not a valid adapter for this model.
    Format(FormatError),
    /// More entries than [`MAX_ENTRIES`].
    TooManyEntries,
    /// The value buffer is too small.
    ValuesTooSmall {
        /// Values needed.
        needed: usize,
    },
    /// The workspace buffer is too small for the LoRA entries.
    WorkspaceTooSmall {
        /// f32 needed.
        needed: usize,
    },
    /// The entry kind does not apply to the op.
    Misplaced {
        /// The op.
        op: u32,
        /// Why.
        why: &'static str,
    },
}

impl From<FormatError> for AdapterError {
    fn from(e: FormatError) -> Self {
        AdapterError::Format(e)
    }
}

impl core::fmt::Display for AdapterError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AdapterError::Format(e) => write!(f, "adapter: {e}"),
            AdapterError::TooManyEntries => write!(f, "adapter: more than {MAX_ENTRIES} entries"),
            AdapterError::ValuesTooSmall { needed } => {
                write!(f, "adapter: value buffer needs {needed} f32")
            }
            AdapterError::WorkspaceTooSmall { needed } => {
                write!(f, "adapter: workspace needs {needed} f32")
            }
            AdapterError::Misplaced { op, why } => write!(f, "adapter entry on op #{op}: {why}"),
        }
    }
}

/// An adapter split for one run: read-only values, writable workspace.
pub(crate) struct AdapterParts<'a> {
    pub entries: &'a [Entry],
    pub values: &'a [f32],
    pub workspace: &'a mut [f32],
}

impl<'a> AdapterParts<'a> {
    /// The read-only half and the workspace, borrowed apart.
    pub fn split(&mut self) -> (AdapterValues<'_>, &mut [f32]) {
        (
            AdapterValues {
                entries: self.entries,
                values: self.values,
            },
            &mut *self.workspace,
        )
    }
}

/// The entries and values of an adapter during a run.
#[derive(Clone, Copy)]
pub(crate) struct AdapterValues<'a> {
    pub entries: &'a [Entry],
    pub values: &'a [f32],
}

impl<'a> AdapterValues<'a> {
    pub fn find(&self, op: u32, kind: EntryKind) -> Option<(Entry, &'a [f32])> {
        self.entries
            .iter()
            .find(|e| e.op == op && e.kind == kind)
            .map(|e| (*e, &self.values[e.range()]))
    }
}

/// f32 of workspace a LoRA pair on `op` needs: its intermediate `A·x`.
pub fn lora_workspace(model: &Model<'_>, op: u32, rank: u16) -> usize {
    let info = model.op(op);
    let y = model.tensor(info.output(0)).meta.shape;
    match info.op {
        // [batch, r, Ho, Wo] for a convolution, [rows, r] for a dense layer.
        Op::Conv(_) => y.dim(0) * rank as usize * y.dim(2) * y.dim(3),
        _ => y.numel() / y.back(1) * rank as usize,
    }
}

impl<'b> Adapter<'b> {
    /// An adapter with no entries.
    pub fn empty(values: &'b mut [f32], workspace: &'b mut [f32]) -> Adapter<'b> {
        Adapter {
            entries: heapless::Vec::new(),
            values,
            used: 0,
            workspace,
        }
    }

    /// An adapter over `values` laid out as `entries` describe (e.g. kept across runs by a
    /// host or restored from a store): every entry is checked against `model`.
    pub fn from_parts(
        model: &Model<'_>,
        entries: &[Entry],
        values: &'b mut [f32],
        workspace: &'b mut [f32],
    ) -> Result<Adapter<'b>, AdapterError> {
        let mut a = Adapter::empty(values, workspace);
        for e in entries {
            let (rows, cols) = expected_shape(model, e.kind, e.op, e.rank)
                .map_err(|why| AdapterError::Misplaced { op: e.op, why })?;
            if e.rows != rows
                || e.cols != cols
                || e.len != rows * cols
                || e.offset as usize != a.used
            {
                return Err(AdapterError::Misplaced {
                    op: e.op,
                    why: "entry shape or offset does not match the model",
                });
            }
            if a.used + e.len as usize > a.values.len() {
                return Err(AdapterError::ValuesTooSmall {
                    needed: a.used + e.len as usize,
                });
            }
            a.entries
                .push(*e)
                .map_err(|_| AdapterError::TooManyEntries)?;
            a.used += e.len as usize;
        }
        a.check_workspace(model)?;
        Ok(a)
    }

    /// Loads a `.eta` file checked against `model` into the caller's buffers.
    pub fn load(
        bytes: &[u8],
        model: &Model<'_>,
        values: &'b mut [f32],
        workspace: &'b mut [f32],
    ) -> Result<Adapter<'b>, AdapterError> {
        let view = AdapterView::from_bytes(bytes, model)?;
        if values.len() < view.value_count() {
            return Err(AdapterError::ValuesTooSmall {
                needed: view.value_count(),
            });
        }
        let mut a = Adapter::empty(values, workspace);
        for i in 0..view.len() {
            a.entries
                .push(view.entry(i))
                .map_err(|_| AdapterError::TooManyEntries)?;
        }
        for (i, v) in a.values.iter_mut().enumerate().take(view.value_count()) {
            *v = view.value(i);
        }
        a.used = view.value_count();
        a.check_workspace(model)?;
        Ok(a)
    }

    fn check_workspace(&self, model: &Model<'_>) -> Result<(), AdapterError> {
        let needed = self.workspace_needed(model);
        if self.workspace.len() < needed {
            return Err(AdapterError::WorkspaceTooSmall { needed });
        }
        Ok(())
    }

    /// Workspace the LoRA entries need.
    pub fn workspace_needed(&self, model: &Model<'_>) -> usize {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::LoraA)
            .map(|e| lora_workspace(model, e.op, e.rank))
            .max()
            .unwrap_or(0)
    }

    /// Adds an entry of `kind` on `op` (shape from the model), filled by `init(index) -> value`.
    pub fn add(
        &mut self,
        model: &Model<'_>,
        kind: EntryKind,
        op: u32,
        rank: u16,
        alpha: f32,
        init: impl FnMut(usize) -> f32,
    ) -> Result<Entry, AdapterError> {
        let (rows, cols) = expected_shape(model, kind, op, rank)
            .map_err(|why| AdapterError::Misplaced { op, why })?;
        let len = (rows * cols) as usize;
        if self.used + len > self.values.len() {
            return Err(AdapterError::ValuesTooSmall {
                needed: self.used + len,
            });
        }
        let e = Entry {
            kind,
            op,
            offset: self.used as u32,
            len: len as u32,
            rows,
            cols,
            rank,
            alpha,
        };
        self.entries
            .push(e)
            .map_err(|_| AdapterError::TooManyEntries)?;
        self.values[self.used..self.used + len]
            .iter_mut()
            .enumerate()
            .for_each({
                let mut init = init;
                move |(i, v)| *v = init(i)
            });
        self.used += len;
        if kind == EntryKind::LoraA {
            self.check_workspace(model)?;
        }
        Ok(e)
    }

    /// The entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// All trainable values (what zeroth-order steps perturb).
    pub fn values(&self) -> &[f32] {
        &self.values[..self.used]
    }

    /// All trainable values, mutably.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values[..self.used]
    }

    /// The values of entry `e`.
    pub fn slice(&self, e: &Entry) -> &[f32] {
        &self.values[e.range()]
    }

    /// The entry of `kind` on `op`, if any.
    pub fn find(&self, op: u32, kind: EntryKind) -> Option<&Entry> {
        self.entries.iter().find(|e| e.op == op && e.kind == kind)
    }

    /// True when some entry applies to `op`.
    pub fn touches(&self, op: u32) -> bool {
        self.entries.iter().any(|e| e.op == op)
    }

    /// The first op any entry applies to (where a cached prefix can end).
    pub fn first_op(&self) -> Option<u32> {
        self.entries.iter().map(|e| e.op).min()
    }

    /// Entries and values to read, and the workspace to write, borrowed apart for one run.
    pub(crate) fn parts(&mut self) -> AdapterParts<'_> {
        AdapterParts {
            entries: &self.entries,
            values: &self.values[..self.used],
            workspace: self.workspace,
        }
    }

    /// Bytes of the `.eta` file [`Adapter::save`] writes.
    pub fn file_len(&self) -> usize {
        adapter_len(self.entries.len(), self.used)
    }

    /// Writes the adapter as a `.eta` file into `out`; returns the bytes written.
    pub fn save<'o>(&self, model: &Model<'_>, out: &'o mut [u8]) -> Result<&'o [u8], AdapterError> {
        Ok(write_adapter(&self.entries, self.values(), model, out)?)
    }
}

/// A block-quantized weight whose tables or group scales an adapter overrides (for training:
/// the codes stay in flash, the small parameters are the adapter's f32 values).
#[derive(Debug, Clone, Copy)]
pub struct AdaptedQ<'a> {
    /// The frozen weight.
    pub q: crate::kernels::qgemm::QWeights<'a>,
    /// Replacement tables `[tables, 2^bits]`.
    pub centroids: Option<&'a [f32]>,
    /// Log-multipliers of the group scales `[N, groups]`.
    pub log_scales: Option<&'a [f32]>,
}

impl AdaptedQ<'_> {
    /// `C = act(A · Wᵀ + bias)` with f32 activations and the overrides: the reference
    /// block-quantized kernel reading the adapter's values.
    pub fn gemm(&self, g: crate::kernels::qgemm::QGemm<'_>) {
        crate::kernels::qgemm::generic::qgemm_f32_with(&self.q, self.centroids, self.log_scales, g)
    }
}
