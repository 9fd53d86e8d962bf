//! Element types, weight encodings and shapes.

/// Highest tensor rank the format stores.
pub const MAX_RANK: usize = 6;

/// Width (output channels) of one panel in the [`Encoding::PanelF32`] layout.
pub const PANEL: usize = 16;

/// Element type of a tensor's logical values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 1,
    /// IEEE 754 binary16.
    F16 = 2,
    /// Signed 64-bit integer (ONNX index tensors).
    I64 = 3,
    /// Signed 32-bit integer.
    I32 = 4,
    /// Signed 8-bit integer.
    I8 = 5,
    /// Unsigned 8-bit integer.
    U8 = 6,
    /// Boolean, one byte per element (0 or 1).
    Bool = 7,
}

impl DType {
    /// Decodes a stored code.
    pub fn from_code(code: u8) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::F16,
            3 => DType::I64,
            4 => DType::I32,
            5 => DType::I8,
            6 => DType::U8,
            7 => DType::Bool,
            _ => return None,
        })
    }

    /// Bytes per element in plain layout.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I64 => 8,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Short lowercase name (`f32`, `i64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }
}

/// How a tensor's bytes represent its logical values.
///
/// Activations are always [`Encoding::Plain`]. Weights may use a packed or compressed encoding;
/// kernels read each encoding directly, so a compressed weight never exists as an f32 copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// Row-major elements of the tensor's dtype.
    Plain = 0,
    /// An f32 matrix `[N, K]` (N outputs, K inputs) stored in panels of [`PANEL`] outputs: panel
    /// `p` holds, for each `k`, the 16 values `w[16p + j][k]`, zero-padded past `N`. This is the
    /// layout the f32 GEMM micro-kernels stream.
    PanelF32 = 1,
    /// [`Encoding::PanelF32`] with f16 values (half the bytes, converted in registers).
    PanelF16 = 2,
    /// Block-quantized codes with lookup tables and group scales (int8, int4, ternary, binary,
    /// codebooks): see [`crate::layout::QBlockLayout`].
    QBlock = 3,
    /// N:M structured sparsity, f16 values: see [`crate::layout::SparseLayout`].
    SparseNM = 4,
}

impl Encoding {
    /// Decodes a stored code.
    pub fn from_code(code: u8) -> Option<Encoding> {
        Some(match code {
            0 => Encoding::Plain,
            1 => Encoding::PanelF32,
            2 => Encoding::PanelF16,
            3 => Encoding::QBlock,
            4 => Encoding::SparseNM,
            _ => return None,
        })
    }

    /// Short lowercase name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Plain => "plain",
            Encoding::PanelF32 => "f32-panel16",
            Encoding::PanelF16 => "f16-panel16",
            Encoding::QBlock => "qblock",
            Encoding::SparseNM => "sparse-n:m",
        }
    }

    /// True for the layouts of `[N, K]` weight matrices read by dense and convolution kernels.
    pub fn is_weight_layout(self) -> bool {
        self != Encoding::Plain
    }
}

/// A concrete shape of rank at most [`MAX_RANK`].
///
/// ```
/// use edgetune_core::Shape;
/// let s = Shape::new(&[2, 3, 4]).unwrap();
/// assert_eq!(s.numel(), 24);
/// assert_eq!(s.dims(), &[2, 3, 4]);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Shape {
    rank: u8,
    dims: [u32; MAX_RANK],
}

impl core::fmt::Debug for Shape {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.dims().iter().enumerate() {
            if i > 0 {
                write!(f, "x")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl core::fmt::Display for Shape {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

impl Shape {
    /// A shape from its dimensions; `None` when the rank exceeds [`MAX_RANK`] or a dimension does
    /// not fit in `u32`.
    pub fn new(dims: &[usize]) -> Option<Shape> {
        if dims.len() > MAX_RANK {
            return None;
        }
        let mut s = Shape {
            rank: dims.len() as u8,
            dims: [0; MAX_RANK],
        };
        for (o, &d) in s.dims.iter_mut().zip(dims) {
            *o = u32::try_from(d).ok()?;
        }
        Some(s)
    }

    /// The rank-0 shape of a scalar.
    pub fn scalar() -> Shape {
        Shape::default()
    }

    /// Builds a shape from stored words; `None` when `rank` is too high.
    pub fn from_stored(rank: u8, dims: [u32; MAX_RANK]) -> Option<Shape> {
        if rank as usize > MAX_RANK {
            return None;
        }
        let mut s = Shape {
            rank,
            dims: [0; MAX_RANK],
        };
        s.dims[..rank as usize].copy_from_slice(&dims[..rank as usize]);
        Some(s)
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.rank as usize
    }

    /// The dimensions.
    pub fn dims(&self) -> &[u32] {
        &self.dims[..self.rank as usize]
    }

    /// Dimension `i` as `usize` (panics if `i >= rank`).
    pub fn dim(&self, i: usize) -> usize {
        self.dims()[i] as usize
    }

    /// Dimension counted from the end: `back(1)` is the last.
    pub fn back(&self, i: usize) -> usize {
        self.dims()[self.rank as usize - i] as usize
    }

    /// The stored dimension words (unused ones zero).
    pub fn stored(&self) -> [u32; MAX_RANK] {
        self.dims
    }

    /// Element count, `None` on overflow.
    pub fn checked_numel(&self) -> Option<u64> {
        self.dims()
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
    }

    /// Element count (validated shapes never overflow).
    pub fn numel(&self) -> usize {
        self.dims().iter().map(|&d| d as usize).product()
    }

    /// Row-major strides in elements.
    pub fn strides(&self) -> [usize; MAX_RANK] {
        let mut st = [0usize; MAX_RANK];
        let mut acc = 1usize;
        for i in (0..self.rank()).rev() {
            st[i] = acc;
            acc *= self.dims[i] as usize;
        }
        st
    }

    /// Product of dimensions `from..to`.
    pub fn prod(&self, from: usize, to: usize) -> usize {
        self.dims()[from..to].iter().map(|&d| d as usize).product()
    }

    /// Same shape with dimension `i` replaced.
    pub fn with_dim(mut self, i: usize, d: u32) -> Shape {
        self.dims[i] = d;
        self
    }
}

/// Bytes a tensor occupies in the file or arena, or `None` when the encoding does not apply to
/// this dtype, shape and parameters, or the size overflows.
pub fn encoded_len(
    dtype: DType,
    encoding: Encoding,
    shape: &Shape,
    params: [u32; 4],
) -> Option<u64> {
    if encoding == Encoding::Plain {
        return shape.checked_numel()?.checked_mul(dtype.size() as u64);
    }
    if dtype != DType::F32 || shape.rank() != 2 {
        return None;
    }
    let (n, k) = (shape.dims()[0] as usize, shape.dims()[1] as usize);
    let len = match encoding {
        Encoding::Plain => unreachable!(),
        Encoding::PanelF32 => {
            if params != [0; 4] {
                return None;
            }
            n.div_ceil(PANEL).checked_mul(k)?.checked_mul(PANEL * 4)?
        }
        Encoding::PanelF16 => {
            if params != [0; 4] {
                return None;
            }
            crate::layout::panel_f16_len(n, k)?
        }
        Encoding::QBlock => crate::layout::QBlockLayout::new(n, k, params)?.len,
        Encoding::SparseNM => crate::layout::SparseLayout::new(n, k, params)?.len,
    };
    Some(len as u64)
}
