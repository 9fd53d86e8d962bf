//! The op set: codes, typed attributes, and the shape rules that validation enforces.
//!
//! Attributes are stored as a short list of little-endian `u32` words (floats as their bits). Each
//! op decodes them into a typed value here, so the runtime never interprets raw words.

use crate::error::{FormatError, Place};
use crate::tensor::{DType, Encoding, Shape, MAX_RANK, PANEL};

/// Most attribute words any op stores.
pub const MAX_ATTR_WORDS: usize = 16;

/// An element-wise function of one f32, used both as the `Unary` op and as an activation fused
/// into `Conv` and `Dense`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activation {
    /// Which function.
    pub kind: ActKind,
    /// First parameter (clip minimum, hard-sigmoid alpha, leaky slope).
    pub a: f32,
    /// Second parameter (clip maximum, hard-sigmoid beta).
    pub b: f32,
}

impl Activation {
    /// The identity (no activation).
    pub const NONE: Activation = Activation {
        kind: ActKind::Identity,
        a: 0.0,
        b: 0.0,
    };

    /// An activation without parameters.
    pub const fn plain(kind: ActKind) -> Activation {
        Activation {
            kind,
            a: 0.0,
            b: 0.0,
        }
    }

    /// True for the identity.
    pub fn is_identity(&self) -> bool {
        self.kind == ActKind::Identity
    }
}

/// Element-wise f32 functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ActKind {
    /// `x`.
    Identity = 0,
    /// `max(x, 0)`.
    Relu = 1,
    /// `min(max(x, a), b)`.
    Clip = 2,
    /// `1 / (1 + e^-x)`.
    Sigmoid = 3,
    /// `clip(a·x + b, 0, 1)`.
    HardSigmoid = 4,
    /// `x · clip(a·x + b, 0, 1)`.
    HardSwish = 5,
    /// `tanh x`.
    Tanh = 6,
    /// The error function.
    Erf = 7,
    /// `x/2 · (1 + erf(x/√2))`.
    Gelu = 8,
    /// `√x`.
    Sqrt = 9,
    /// `1/√x`.
    Rsqrt = 10,
    /// `e^x`.
    Exp = 11,
    /// `ln x`.
    Log = 12,
    /// `-x`.
    Neg = 13,
    /// `|x|`.
    Abs = 14,
    /// `1/x`.
    Recip = 15,
    /// `x²`.
    Square = 16,
    /// `x` if `x ≥ 0` else `a·x`.
    LeakyRelu = 17,
    /// `⌊x⌋`.
    Floor = 18,
    /// `⌈x⌉`.
    Ceil = 19,
    /// Round half to even.
    Round = 20,
    /// `sin x`.
    Sin = 21,
    /// `cos x`.
    Cos = 22,
}

impl ActKind {
    fn from_code(c: u32) -> Option<ActKind> {
        use ActKind::*;
        Some(match c {
            0 => Identity,
            1 => Relu,
            2 => Clip,
            3 => Sigmoid,
            4 => HardSigmoid,
            5 => HardSwish,
            6 => Tanh,
            7 => Erf,
            8 => Gelu,
            9 => Sqrt,
            10 => Rsqrt,
            11 => Exp,
            12 => Log,
            13 => Neg,
            14 => Abs,
            15 => Recip,
            16 => Square,
            17 => LeakyRelu,
            18 => Floor,
            19 => Ceil,
            20 => Round,
            21 => Sin,
            22 => Cos,
            _ => return None,
        })
    }
}

/// Two-operand element-wise ops with NumPy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BinaryKind {
    /// `a + b`.
    Add = 0,
    /// `a - b`.
    Sub = 1,
    /// `a · b`.
    Mul = 2,
    /// `a / b` (integer division truncates; division by zero gives 0 for integers).
    Div = 3,
    /// `a ^ b`.
    Pow = 4,
    /// `min(a, b)`.
    Min = 5,
    /// `max(a, b)`.
    Max = 6,
    /// `a == b` (bool result).
    Equal = 7,
    /// `a < b` (bool result).
    Less = 8,
    /// `a > b` (bool result).
    Greater = 9,
    /// `a <= b` (bool result).
    LessEq = 10,
    /// `a >= b` (bool result).
    GreaterEq = 11,
    /// Logical and of bools.
    And = 12,
    /// Logical or of bools.
    Or = 13,
}

impl BinaryKind {
    fn from_code(c: u32) -> Option<BinaryKind> {
        use BinaryKind::*;
        Some(match c {
            0 => Add,
            1 => Sub,
            2 => Mul,
            3 => Div,
            4 => Pow,
            5 => Min,
            6 => Max,
            7 => Equal,
            8 => Less,
            9 => Greater,
            10 => LessEq,
            11 => GreaterEq,
            12 => And,
            13 => Or,
            _ => return None,
        })
    }

    /// True when the result is a bool tensor.
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryKind::Equal
                | BinaryKind::Less
                | BinaryKind::Greater
                | BinaryKind::LessEq
                | BinaryKind::GreaterEq
        )
    }

    /// True for the logical ops on bools.
    pub fn is_logical(self) -> bool {
        matches!(self, BinaryKind::And | BinaryKind::Or)
    }
}

/// Reductions over a set of axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReduceKind {
    /// Sum.
    Sum = 0,
    /// Arithmetic mean.
    Mean = 1,
    /// Maximum.
    Max = 2,
    /// Minimum.
    Min = 3,
    /// Product.
    Prod = 4,
    /// Sum of squares.
    SumSquare = 5,
}

impl ReduceKind {
    fn from_code(c: u32) -> Option<ReduceKind> {
        use ReduceKind::*;
        Some(match c {
            0 => Sum,
            1 => Mean,
            2 => Max,
            3 => Min,
            4 => Prod,
            5 => SumSquare,
            _ => return None,
        })
    }
}

/// 2-D convolution over NCHW activations.
///
/// Weight: the logical matrix `[Cout, Cin/groups · kh · kw]` (row `co`, column `(ci, ky, kx)`),
/// either [`Encoding::PanelF32`] (groups = 1) or plain. Depthwise convolutions (groups = Cin =
/// Cout) store `[C, kh · kw]` plain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conv {
    /// Kernel height and width.
    pub kernel: [u32; 2],
    /// Stride along H and W.
    pub stride: [u32; 2],
    /// Padding: top, left, bottom, right.
    pub pads: [u32; 4],
    /// Dilation along H and W.
    pub dilation: [u32; 2],
    /// Number of groups.
    pub groups: u32,
    /// Activation applied to each output.
    pub act: Activation,
    /// Output pixels unrolled per im2col tile (0 when the convolution needs no im2col).
    pub col_tile: u32,
}

/// Fully-connected layer: `y[.., n] = act(Σ_k x[.., k] · w[n, k] + bias[n])`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dense {
    /// Activation applied to each output.
    pub act: Activation,
}

/// Batched product of two activations, `y[.., m, n] = Σ_k a[.., m, k] · b[.., k, n]`.
///
/// `a`, `b` and `y` have the same rank; each names which of its axes plays the row (`m`), inner
/// (`k`) and column (`n`) role, and the remaining axes, in order, are batch axes that broadcast
/// (size 1 against size d). Attention's `Q·Kᵀ` and `P·V` over `[batch, seq, heads, dim]` tensors
/// run in place this way, without transposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatMul {
    /// Axis of `a` holding `m`.
    pub a_m: u8,
    /// Axis of `a` holding `k`.
    pub a_k: u8,
    /// Axis of `b` holding `k`.
    pub b_k: u8,
    /// Axis of `b` holding `n`.
    pub b_n: u8,
    /// Axis of `y` holding `m`.
    pub y_m: u8,
    /// Axis of `y` holding `n`.
    pub y_n: u8,
}

impl MatMul {
    /// The plain layout `a[.., M, K] · b[.., K, N] -> y[.., M, N]` at rank `r` (≥ 2).
    pub fn standard(r: usize) -> MatMul {
        let r = r as u8;
        MatMul {
            a_m: r - 2,
            a_k: r - 1,
            b_k: r - 2,
            b_n: r - 1,
            y_m: r - 2,
            y_n: r - 1,
        }
    }

    /// Batch axes of a tensor whose two matrix axes are `x` and `y`, in order.
    pub fn batch_axes(rank: usize, x: u8, y: u8) -> ([usize; MAX_RANK], usize) {
        let mut out = [0usize; MAX_RANK];
        let mut n = 0;
        for i in 0..rank {
            if i != x as usize && i != y as usize {
                out[n] = i;
                n += 1;
            }
        }
        (out, n)
    }
}

/// Max or average pooling over NCHW activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// True for max pooling, false for average pooling.
    pub max: bool,
    /// Window height and width.
    pub kernel: [u32; 2],
    /// Stride along H and W.
    pub stride: [u32; 2],
    /// Padding: top, left, bottom, right.
    pub pads: [u32; 4],
    /// Average pooling divides by the full window, padding included.
    pub count_include_pad: bool,
}

/// An operation of the model, with its attributes.
///
/// Variant fields are described on the variant.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// Inputs `x, w, [bias]`; output `y`; scratch when `col_tile > 0`.
    Conv(Conv),
    /// Inputs `x, w, [bias]`; output `y`.
    Dense(Dense),
    /// Inputs `a, b`; output `y`; scratch of one packed panel of `b`.
    MatMul(MatMul),
    /// Inputs `a, b`; output `y`.
    Binary(BinaryKind),
    /// Input `x`; output `y`.
    Unary(Activation),
    /// Softmax along one axis.
    Softmax { axis: u32 },
    /// Normalises over the trailing axes from `axis`: `(x - mean) / √(var + eps)`, or with
    /// `rms` set `x / √(mean(x²) + eps)`; then `· gamma + beta`. Inputs `x, [gamma], [beta]`.
    LayerNorm { axis: u32, eps: f32, rms: bool },
    /// Reduction over the axes whose bits are set.
    Reduce {
        kind: ReduceKind,
        axes: u32,
        keep_dims: bool,
    },
    /// Pooling window.
    Pool(Pool),
    /// Same bytes, new shape.
    Reshape,
    /// Permutes axes.
    Transpose { perm: [u8; MAX_RANK] },
    /// Joins inputs along an axis.
    Concat { axis: u32 },
    /// Strided window: per axis a start and a (non-zero) step; the output shape gives the count.
    Slice {
        starts: [i32; MAX_RANK],
        steps: [i32; MAX_RANK],
    },
    /// Gathers slices of `data` along `axis` at `indices`: inputs `data, indices`.
    Gather { axis: u32 },
    /// `cond ? a : b` with broadcasting: inputs `cond, a, b`.
    Where,
    /// Element type conversion (floats to integers truncate toward zero and saturate).
    Cast,
    /// Broadcasts the input to the output shape.
    Expand,
    /// True where an f32 is NaN.
    IsNan,
}

/// Stored op codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum OpCode {
    /// [`Op::Conv`].
    Conv = 1,
    /// [`Op::Dense`].
    Dense = 2,
    /// [`Op::MatMul`].
    MatMul = 3,
    /// [`Op::Binary`].
    Binary = 4,
    /// [`Op::Unary`].
    Unary = 5,
    /// [`Op::Softmax`].
    Softmax = 6,
    /// [`Op::LayerNorm`].
    LayerNorm = 7,
    /// [`Op::Reduce`].
    Reduce = 8,
    /// [`Op::Pool`].
    Pool = 9,
    /// [`Op::Reshape`].
    Reshape = 10,
    /// [`Op::Transpose`].
    Transpose = 11,
    /// [`Op::Concat`].
    Concat = 12,
    /// [`Op::Slice`].
    Slice = 13,
    /// [`Op::Gather`].
    Gather = 14,
    /// [`Op::Where`].
    Where = 15,
    /// [`Op::Cast`].
    Cast = 16,
    /// [`Op::Expand`].
    Expand = 17,
    /// [`Op::IsNan`].
    IsNan = 18,
}

/// Attribute words of one op, without allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttrWords {
    words: [u32; MAX_ATTR_WORDS],
    len: usize,
}

impl AttrWords {
    fn new() -> AttrWords {
        AttrWords {
            words: [0; MAX_ATTR_WORDS],
            len: 0,
        }
    }
    fn push(&mut self, w: u32) {
        self.words[self.len] = w;
        self.len += 1;
    }
    fn push_f(&mut self, f: f32) {
        self.push(f.to_bits());
    }
    fn push_act(&mut self, a: &Activation) {
        self.push(a.kind as u32);
        self.push_f(a.a);
        self.push_f(a.b);
    }
    /// The words.
    pub fn as_slice(&self) -> &[u32] {
        &self.words[..self.len]
    }
}

struct Reader<'a> {
    words: &'a [u32],
    place: Place,
}

impl Reader<'_> {
    fn take(&mut self) -> Result<u32, FormatError> {
        let (&w, rest) = self.words.split_first().ok_or(FormatError::BadAttribute {
            place: self.place,
            what: "too few attribute words",
        })?;
        self.words = rest;
        Ok(w)
    }
    fn f(&mut self) -> Result<f32, FormatError> {
        Ok(f32::from_bits(self.take()?))
    }
    fn flag(&mut self) -> Result<bool, FormatError> {
        match self.take()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FormatError::BadAttribute {
                place: self.place,
                what: "flag is not 0 or 1",
            }),
        }
    }
    fn act(&mut self) -> Result<Activation, FormatError> {
        let code = self.take()?;
        let kind = ActKind::from_code(code).ok_or(FormatError::UnknownCode {
            place: self.place,
            field: "activation",
            value: code,
        })?;
        Ok(Activation {
            kind,
            a: self.f()?,
            b: self.f()?,
        })
    }
    fn pair(&mut self) -> Result<[u32; 2], FormatError> {
        Ok([self.take()?, self.take()?])
    }
    fn quad(&mut self) -> Result<[u32; 4], FormatError> {
        Ok([self.take()?, self.take()?, self.take()?, self.take()?])
    }
    fn done(&self) -> Result<(), FormatError> {
        if self.words.is_empty() {
            Ok(())
        } else {
            Err(FormatError::BadAttribute {
                place: self.place,
                what: "too many attribute words",
            })
        }
    }
}

impl Op {
    /// The stored code of this op.
    pub fn code(&self) -> OpCode {
        match self {
            Op::Conv(_) => OpCode::Conv,
            Op::Dense(_) => OpCode::Dense,
            Op::MatMul(_) => OpCode::MatMul,
            Op::Binary(_) => OpCode::Binary,
            Op::Unary(_) => OpCode::Unary,
            Op::Softmax { .. } => OpCode::Softmax,
            Op::LayerNorm { .. } => OpCode::LayerNorm,
            Op::Reduce { .. } => OpCode::Reduce,
            Op::Pool(_) => OpCode::Pool,
            Op::Reshape => OpCode::Reshape,
            Op::Transpose { .. } => OpCode::Transpose,
            Op::Concat { .. } => OpCode::Concat,
            Op::Slice { .. } => OpCode::Slice,
            Op::Gather { .. } => OpCode::Gather,
            Op::Where => OpCode::Where,
            Op::Cast => OpCode::Cast,
            Op::Expand => OpCode::Expand,
            Op::IsNan => OpCode::IsNan,
        }
    }

    /// A short name for reports (`conv`, `dense`, `add`, `relu`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv(c) if c.groups > 1 => "conv-grouped",
            Op::Conv(_) => "conv",
            Op::Dense(_) => "dense",
            Op::MatMul(_) => "matmul",
            Op::Binary(k) => match k {
                BinaryKind::Add => "add",
                BinaryKind::Sub => "sub",
                BinaryKind::Mul => "mul",
                BinaryKind::Div => "div",
                BinaryKind::Pow => "pow",
                BinaryKind::Min => "min",
                BinaryKind::Max => "max",
                BinaryKind::Equal => "equal",
                BinaryKind::Less => "less",
                BinaryKind::Greater => "greater",
                BinaryKind::LessEq => "less-eq",
                BinaryKind::GreaterEq => "greater-eq",
                BinaryKind::And => "and",
                BinaryKind::Or => "or",
            },
            Op::Unary(a) => match a.kind {
                ActKind::Identity => "identity",
                ActKind::Relu => "relu",
                ActKind::Clip => "clip",
                ActKind::Sigmoid => "sigmoid",
                ActKind::HardSigmoid => "hard-sigmoid",
                ActKind::HardSwish => "hard-swish",
                ActKind::Tanh => "tanh",
                ActKind::Erf => "erf",
                ActKind::Gelu => "gelu",
                ActKind::Sqrt => "sqrt",
                ActKind::Rsqrt => "rsqrt",
                ActKind::Exp => "exp",
                ActKind::Log => "log",
                ActKind::Neg => "neg",
                ActKind::Abs => "abs",
                ActKind::Recip => "recip",
                ActKind::Square => "square",
                ActKind::LeakyRelu => "leaky-relu",
                ActKind::Floor => "floor",
                ActKind::Ceil => "ceil",
                ActKind::Round => "round",
                ActKind::Sin => "sin",
                ActKind::Cos => "cos",
            },
            Op::Softmax { .. } => "softmax",
            Op::LayerNorm { rms: false, .. } => "layer-norm",
            Op::LayerNorm { rms: true, .. } => "rms-norm",
            Op::Reduce { .. } => "reduce",
            Op::Pool(p) if p.max => "max-pool",
            Op::Pool(_) => "avg-pool",
            Op::Reshape => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Concat { .. } => "concat",
            Op::Slice { .. } => "slice",
            Op::Gather { .. } => "gather",
            Op::Where => "where",
            Op::Cast => "cast",
            Op::Expand => "expand",
            Op::IsNan => "is-nan",
        }
    }

    /// Encodes the attributes as stored words.
    pub fn encode(&self) -> AttrWords {
        let mut w = AttrWords::new();
        match self {
            Op::Conv(c) => {
                c.kernel.iter().for_each(|&x| w.push(x));
                c.stride.iter().for_each(|&x| w.push(x));
                c.pads.iter().for_each(|&x| w.push(x));
                c.dilation.iter().for_each(|&x| w.push(x));
                w.push(c.groups);
                w.push_act(&c.act);
                w.push(c.col_tile);
            }
            Op::Dense(d) => w.push_act(&d.act),
            Op::MatMul(m) => {
                for v in [m.a_m, m.a_k, m.b_k, m.b_n, m.y_m, m.y_n] {
                    w.push(v as u32);
                }
            }
            Op::Binary(k) => w.push(*k as u32),
            Op::Unary(a) => w.push_act(a),
            Op::Softmax { axis } => w.push(*axis),
            Op::LayerNorm { axis, eps, rms } => {
                w.push(*axis);
                w.push_f(*eps);
                w.push(*rms as u32);
            }
            Op::Reduce {
                kind,
                axes,
                keep_dims,
            } => {
                w.push(*kind as u32);
                w.push(*axes);
                w.push(*keep_dims as u32);
            }
            Op::Pool(p) => {
                w.push(p.max as u32);
                p.kernel.iter().for_each(|&x| w.push(x));
                p.stride.iter().for_each(|&x| w.push(x));
                p.pads.iter().for_each(|&x| w.push(x));
                w.push(p.count_include_pad as u32);
            }
            Op::Reshape | Op::Where | Op::Cast | Op::Expand | Op::IsNan => {}
            Op::Transpose { perm } => perm.iter().for_each(|&p| w.push(p as u32)),
            Op::Concat { axis } => w.push(*axis),
            Op::Slice { starts, steps } => {
                starts.iter().for_each(|&s| w.push(s as u32));
                steps.iter().for_each(|&s| w.push(s as u32));
            }
            Op::Gather { axis } => w.push(*axis),
        }
        w
    }

    /// Decodes an op from its stored code and attribute words.
    pub fn decode(code: u16, words: &[u32], place: Place) -> Result<Op, FormatError> {
        let mut r = Reader { words, place };
        let bad = |what| FormatError::BadAttribute { place, what };
        let op = match code {
            1 => {
                let kernel = r.pair()?;
                let stride = r.pair()?;
                let pads = r.quad()?;
                let dilation = r.pair()?;
                let groups = r.take()?;
                let act = r.act()?;
                let col_tile = r.take()?;
                if kernel.contains(&0)
                    || stride.contains(&0)
                    || dilation.contains(&0)
                    || groups == 0
                {
                    return Err(bad(
                        "conv kernel, stride, dilation and groups must be positive",
                    ));
                }
                Op::Conv(Conv {
                    kernel,
                    stride,
                    pads,
                    dilation,
                    groups,
                    act,
                    col_tile,
                })
            }
            2 => Op::Dense(Dense { act: r.act()? }),
            3 => {
                let mut ax = [0u8; 6];
                for a in ax.iter_mut() {
                    *a = u8::try_from(r.take()?).map_err(|_| bad("matmul axis too large"))?;
                }
                let [a_m, a_k, b_k, b_n, y_m, y_n] = ax;
                Op::MatMul(MatMul {
                    a_m,
                    a_k,
                    b_k,
                    b_n,
                    y_m,
                    y_n,
                })
            }
            4 => {
                let c = r.take()?;
                Op::Binary(BinaryKind::from_code(c).ok_or(FormatError::UnknownCode {
                    place,
                    field: "binary op",
                    value: c,
                })?)
            }
            5 => Op::Unary(r.act()?),
            6 => Op::Softmax { axis: r.take()? },
            7 => Op::LayerNorm {
                axis: r.take()?,
                eps: r.f()?,
                rms: r.flag()?,
            },
            8 => {
                let c = r.take()?;
                let kind = ReduceKind::from_code(c).ok_or(FormatError::UnknownCode {
                    place,
                    field: "reduction",
                    value: c,
                })?;
                Op::Reduce {
                    kind,
                    axes: r.take()?,
                    keep_dims: r.flag()?,
                }
            }
            9 => {
                let max = r.flag()?;
                let kernel = r.pair()?;
                let stride = r.pair()?;
                let pads = r.quad()?;
                let count_include_pad = r.flag()?;
                if kernel.contains(&0) || stride.contains(&0) {
                    return Err(bad("pool kernel and stride must be positive"));
                }
                Op::Pool(Pool {
                    max,
                    kernel,
                    stride,
                    pads,
                    count_include_pad,
                })
            }
            10 => Op::Reshape,
            11 => {
                let mut perm = [0u8; MAX_RANK];
                for p in perm.iter_mut() {
                    let v = r.take()?;
                    *p = u8::try_from(v).map_err(|_| bad("transpose axis too large"))?;
                }
                Op::Transpose { perm }
            }
            12 => Op::Concat { axis: r.take()? },
            13 => {
                let mut starts = [0i32; MAX_RANK];
                let mut steps = [0i32; MAX_RANK];
                for s in starts.iter_mut() {
                    *s = r.take()? as i32;
                }
                for s in steps.iter_mut() {
                    *s = r.take()? as i32;
                }
                Op::Slice { starts, steps }
            }
            14 => Op::Gather { axis: r.take()? },
            15 => Op::Where,
            16 => Op::Cast,
            17 => Op::Expand,
            18 => Op::IsNan,
            _ => {
                return Err(FormatError::UnknownCode {
                    place,
                    field: "op",
                    value: code as u32,
                })
            }
        };
        r.done()?;
        Ok(op)
    }
}

/// Where a tensor's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Read-only data in the model file.
    Const,
    /// A region of the activation arena.
    Arena,
}

/// What validation knows of a tensor when checking an op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorMeta {
    /// Element type.
    pub dtype: DType,
    /// Byte encoding.
    pub encoding: Encoding,
    /// Logical shape.
    pub shape: Shape,
    /// Where the bytes are.
    pub storage: Storage,
    /// Encoding parameters (constants with a compressed encoding; zero otherwise).
    pub params: [u32; 4],
}

/// NumPy broadcast of two shapes, `None` when incompatible.
pub fn broadcast_shapes(a: &Shape, b: &Shape) -> Option<Shape> {
    let r = a.rank().max(b.rank());
    let mut dims = [0usize; MAX_RANK];
    for i in 0..r {
        let da = if i < r - a.rank() {
            1
        } else {
            a.dim(i - (r - a.rank()))
        };
        let db = if i < r - b.rank() {
            1
        } else {
            b.dim(i - (r - b.rank()))
        };
        dims[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Shape::new(&dims[..r])
}

/// Output size of a windowed op along one axis (floor mode), `None` when the window does not fit.
pub fn window_out(
    input: u32,
    kernel: u32,
    stride: u32,
    pad_lo: u32,
    pad_hi: u32,
    dilation: u32,
) -> Option<u32> {
    let padded = input as u64 + pad_lo as u64 + pad_hi as u64;
    let span = (kernel as u64 - 1) * dilation as u64 + 1;
    if padded < span {
        return None;
    }
    u32::try_from((padded - span) / stride as u64 + 1).ok()
}

/// Scratch bytes an op needs in the arena besides its inputs and outputs.
pub fn scratch_bytes(op: &Op, inputs: &[TensorMeta]) -> u64 {
    // Saturating: a file claiming absurd sizes gets a need no tensor can meet.
    let prod = |xs: &[u64]| xs.iter().fold(1u64, |a, &b| a.saturating_mul(b));
    match op {
        Op::Conv(c) if c.col_tile > 0 => {
            let x = &inputs[0].shape;
            let k = prod(&[
                x.dims()[1] as u64 / c.groups as u64,
                c.kernel[0] as u64,
                c.kernel[1] as u64,
            ]);
            let im2col = prod(&[k, c.col_tile as u64, 4]);
            let q8 = if int8_rows(&inputs[1]) {
                prod(&[c.col_tile as u64, q8_row_bytes(k)])
            } else {
                0
            };
            im2col.saturating_add(q8)
        }
        Op::Dense(_) if int8_rows(&inputs[1]) => {
            let x = &inputs[0].shape;
            let k = x.dims()[x.rank() - 1] as u64;
            let rows = (x.numel() as u64 / k.max(1)).min(Q8_CHUNK_ROWS as u64);
            prod(&[rows, q8_row_bytes(k)])
        }
        Op::MatMul(m) => {
            let b = &inputs[1].shape;
            let (k, n) = (
                b.dims()[m.b_k as usize] as u64,
                b.dims()[m.b_n as usize] as u64,
            );
            prod(&[k, n.div_ceil(PANEL as u64) * PANEL as u64, 4])
        }
        _ => 0,
    }
}

/// Rows of activations quantized to int8 at a time by dense layers (bounds their scratch).
pub const Q8_CHUNK_ROWS: usize = 64;

/// Bytes of one int8-quantized activation row of `k` inputs: `Kp` codes then `Kp/32` f32 scales.
pub fn q8_row_bytes(k: u64) -> u64 {
    let kp = k.div_ceil(32).saturating_mul(32);
    kp.saturating_add(kp / 32 * 4)
}

/// True when a weight asks for int8-quantized activation rows.
fn int8_rows(w: &TensorMeta) -> bool {
    w.encoding == Encoding::QBlock && w.params[3] & crate::layout::QFLAG_INT8_ACTIVATIONS != 0
}

/// True when a convolution is depthwise (one input channel per output channel).
pub fn is_depthwise(c: &Conv, x: &Shape, cout: usize) -> bool {
    c.groups > 1 && c.groups as usize == x.dim(1) && cout == x.dim(1)
}

/// Multiply-accumulate count of an op (0 for data movement), for reports.
pub fn macs(op: &Op, inputs: &[TensorMeta], outputs: &[TensorMeta]) -> u64 {
    let out = outputs.first().map(|o| o.shape.numel() as u64).unwrap_or(0);
    let prod = |xs: &[u64]| xs.iter().fold(out, |a, &b| a.saturating_mul(b));
    match op {
        Op::Conv(c) => {
            let cin_g = inputs[0].shape.dim(1) as u64 / c.groups as u64;
            prod(&[cin_g, c.kernel[0] as u64, c.kernel[1] as u64])
        }
        Op::Dense(_) => prod(&[inputs[0].shape.back(1) as u64]),
        Op::MatMul(m) => prod(&[inputs[0].shape.dim(m.a_k as usize) as u64]),
        Op::Pool(p) => prod(&[p.kernel[0] as u64, p.kernel[1] as u64]),
        Op::Binary(_) | Op::Unary(_) | Op::Softmax { .. } | Op::LayerNorm { .. } | Op::IsNan => out,
        Op::Reduce { .. } => inputs[0].shape.numel() as u64,
        _ => 0,
    }
}

fn arity(place: Place, ok: bool, expected: &'static str, found: usize) -> Result<(), FormatError> {
    if ok {
        Ok(())
    } else {
        Err(FormatError::Arity {
            place,
            expected,
            found: found as u32,
        })
    }
}

fn need(place: Place, ok: bool, what: &'static str) -> Result<(), FormatError> {
    if ok {
        Ok(())
    } else {
        Err(FormatError::BadShape { place, what })
    }
}

fn need_dtype(place: Place, ok: bool, what: &'static str) -> Result<(), FormatError> {
    if ok {
        Ok(())
    } else {
        Err(FormatError::BadDType { place, what })
    }
}

fn plain_f32(t: &TensorMeta) -> bool {
    t.dtype == DType::F32 && t.encoding == Encoding::Plain
}

/// Checks an op against its input and output tensors: arity, data types, encodings and that the
/// output shapes are what the op computes. The runtime's kernels rely on this.
pub fn check(
    op: &Op,
    inputs: &[TensorMeta],
    outputs: &[TensorMeta],
    place: Place,
) -> Result<(), FormatError> {
    let ni = inputs.len();
    arity(place, outputs.len() == 1, "1 output", outputs.len())?;
    let y = &outputs[0];
    need_dtype(
        place,
        y.encoding == Encoding::Plain,
        "outputs must be plain",
    )?;
    need_dtype(
        place,
        y.storage == Storage::Arena,
        "outputs must live in the arena",
    )?;
    for (i, t) in inputs.iter().enumerate() {
        // Weights of dense layers and convolutions, and embedding tables (gathered by row).
        let weight = matches!(op, Op::Conv(_) | Op::Dense(_)) && i == 1;
        let table =
            matches!(op, Op::Gather { axis: 0 }) && i == 0 && t.encoding == Encoding::QBlock;
        need_dtype(
            place,
            t.encoding == Encoding::Plain || weight || table,
            "only weights and embedding tables may be encoded",
        )?;
    }
    let bad_attr = |what| FormatError::BadAttribute { place, what };
    match op {
        Op::Conv(c) => {
            arity(place, ni == 2 || ni == 3, "2 or 3 inputs (x, w, bias)", ni)?;
            let (x, w) = (&inputs[0], &inputs[1]);
            need_dtype(
                place,
                plain_f32(x) && y.dtype == DType::F32,
                "conv needs f32 activations",
            )?;
            need_dtype(place, w.dtype == DType::F32, "conv weight must be f32")?;
            need(
                place,
                x.shape.rank() == 4 && w.shape.rank() == 2,
                "conv needs x [N,C,H,W] and w [Cout,K]",
            )?;
            let cin = x.shape.dim(1) as u32;
            let cout = w.shape.dim(0);
            if cin % c.groups != 0 || cout as u32 % c.groups != 0 {
                return Err(bad_attr("channels not divisible by groups"));
            }
            // u64: kernel dimensions come from the file and may be huge.
            let k = ((cin / c.groups) as u64)
                .checked_mul(c.kernel[0] as u64)
                .and_then(|v| v.checked_mul(c.kernel[1] as u64));
            need(
                place,
                Some(w.shape.dims()[1] as u64) == k,
                "conv weight columns != Cin/groups * kh * kw",
            )?;
            if c.groups > 1 {
                need_dtype(
                    place,
                    w.encoding == Encoding::Plain,
                    "grouped conv weights are plain",
                )?;
            }
            // Dot-product kernels (block-quantized, sparse) read activation rows contiguous in K,
            // so those weights always go through an im2col tile.
            let needs_rows = matches!(w.encoding, Encoding::QBlock | Encoding::SparseNM);
            let ho = window_out(
                x.shape.dims()[2],
                c.kernel[0],
                c.stride[0],
                c.pads[0],
                c.pads[2],
                c.dilation[0],
            );
            let wo = window_out(
                x.shape.dims()[3],
                c.kernel[1],
                c.stride[1],
                c.pads[1],
                c.pads[3],
                c.dilation[1],
            );
            let (ho, wo) = ho
                .zip(wo)
                .ok_or(bad_attr("conv window larger than padded input"))?;
            let expect = Shape::new(&[x.shape.dim(0), cout, ho as usize, wo as usize]);
            need(place, expect == Some(y.shape), "conv output shape")?;
            let pointwise = c.kernel == [1, 1] && c.stride == [1, 1] && c.pads == [0; 4];
            let dw = is_depthwise(c, &x.shape, cout);
            if dw {
                need_dtype(
                    place,
                    w.encoding == Encoding::Plain,
                    "depthwise weights are plain",
                )?;
            }
            // Plain weights run the direct kernel; panels read pointwise inputs in place; every
            // other convolution unrolls tiles of output pixels.
            let tiled = match w.encoding {
                Encoding::Plain => false,
                Encoding::PanelF32 | Encoding::PanelF16 => !pointwise,
                _ => true,
            };
            if !tiled {
                if c.col_tile != 0 {
                    return Err(bad_attr("this conv takes no im2col tile"));
                }
            } else if needs_rows && c.groups != 1 {
                return Err(bad_attr("compressed conv weights need groups = 1"));
            } else if c.col_tile == 0 || c.col_tile as u64 > ho as u64 * wo as u64 {
                return Err(bad_attr("im2col tile must be in 1..=output pixels"));
            }
            check_bias(place, inputs.get(2), cout)?;
        }
        Op::Dense(_) => {
            arity(place, ni == 2 || ni == 3, "2 or 3 inputs (x, w, bias)", ni)?;
            let (x, w) = (&inputs[0], &inputs[1]);
            need_dtype(
                place,
                plain_f32(x) && y.dtype == DType::F32,
                "dense needs f32 activations",
            )?;
            need_dtype(place, w.dtype == DType::F32, "dense weight must be f32")?;
            need(
                place,
                x.shape.rank() >= 1 && w.shape.rank() == 2,
                "dense needs x [..,K] and w [N,K]",
            )?;
            need(
                place,
                x.shape.back(1) == w.shape.dim(1),
                "dense inner dimension",
            )?;
            let n = w.shape.dim(0);
            let r = x.shape.rank();
            need(
                place,
                y.shape == x.shape.with_dim(r - 1, n as u32),
                "dense output shape",
            )?;
            check_bias(place, inputs.get(2), n)?;
        }
        Op::MatMul(mm) => {
            arity(place, ni == 2, "2 inputs", ni)?;
            let (a, b) = (&inputs[0], &inputs[1]);
            need_dtype(
                place,
                plain_f32(a) && plain_f32(b) && y.dtype == DType::F32,
                "matmul is f32",
            )?;
            let r = y.shape.rank();
            need(
                place,
                r >= 2 && a.shape.rank() == r && b.shape.rank() == r,
                "matmul operands share a rank >= 2",
            )?;
            let axes_ok = [(mm.a_m, mm.a_k), (mm.b_k, mm.b_n), (mm.y_m, mm.y_n)]
                .iter()
                .all(|&(x, z)| x != z && (x as usize) < r && (z as usize) < r);
            if !axes_ok {
                return Err(bad_attr("matmul axes"));
            }
            let d = |t: &TensorMeta, ax: u8| t.shape.dim(ax as usize);
            need(
                place,
                d(a, mm.a_k) == d(b, mm.b_k),
                "matmul inner dimension",
            )?;
            need(
                place,
                d(y, mm.y_m) == d(a, mm.a_m) && d(y, mm.y_n) == d(b, mm.b_n),
                "matmul output shape",
            )?;
            let (ab, nb) = MatMul::batch_axes(r, mm.a_m, mm.a_k);
            let (bb, _) = MatMul::batch_axes(r, mm.b_k, mm.b_n);
            let (yb, _) = MatMul::batch_axes(r, mm.y_m, mm.y_n);
            for i in 0..nb {
                let (da, db, dy) = (a.shape.dim(ab[i]), b.shape.dim(bb[i]), y.shape.dim(yb[i]));
                need(
                    place,
                    (da == dy || da == 1) && (db == dy || db == 1),
                    "matmul batch dims do not broadcast",
                )?;
            }
        }
        Op::Binary(kind) => {
            arity(place, ni == 2, "2 inputs", ni)?;
            let (a, b) = (&inputs[0], &inputs[1]);
            need_dtype(place, a.dtype == b.dtype, "binary operands differ in type")?;
            if kind.is_logical() {
                need_dtype(
                    place,
                    a.dtype == DType::Bool && y.dtype == DType::Bool,
                    "logical ops take bools",
                )?;
            } else if kind.is_comparison() {
                need_dtype(
                    place,
                    y.dtype == DType::Bool && numeric(a.dtype),
                    "comparisons give bools",
                )?;
            } else {
                need_dtype(
                    place,
                    y.dtype == a.dtype && numeric(a.dtype),
                    "arithmetic on f32/i64/i32",
                )?;
            }
            need(
                place,
                broadcast_shapes(&a.shape, &b.shape) == Some(y.shape),
                "broadcast output shape",
            )?;
        }
        Op::Unary(_) => {
            arity(place, ni == 1, "1 input", ni)?;
            need_dtype(
                place,
                plain_f32(&inputs[0]) && y.dtype == DType::F32,
                "unary ops are f32",
            )?;
            need(place, inputs[0].shape == y.shape, "unary output shape")?;
        }
        Op::Softmax { axis } => {
            arity(place, ni == 1, "1 input", ni)?;
            need_dtype(
                place,
                plain_f32(&inputs[0]) && y.dtype == DType::F32,
                "softmax is f32",
            )?;
            need(place, inputs[0].shape == y.shape, "softmax output shape")?;
            if *axis as usize >= y.shape.rank() {
                return Err(bad_attr("softmax axis out of range"));
            }
        }
        Op::LayerNorm { axis, .. } => {
            arity(
                place,
                (1..=3).contains(&ni),
                "1 to 3 inputs (x, gamma, beta)",
                ni,
            )?;
            let x = &inputs[0];
            need_dtype(
                place,
                plain_f32(x) && y.dtype == DType::F32,
                "layer norm is f32",
            )?;
            need(place, x.shape == y.shape, "layer norm output shape")?;
            let ax = *axis as usize;
            if ax >= x.shape.rank() {
                return Err(bad_attr("layer norm axis out of range"));
            }
            let inner = x.shape.prod(ax, x.shape.rank());
            for p in &inputs[1..] {
                need_dtype(place, plain_f32(p), "layer norm parameters are f32")?;
                need(place, p.shape.numel() == inner, "layer norm parameter size")?;
            }
        }
        Op::Reduce {
            axes, keep_dims, ..
        } => {
            arity(place, ni == 1, "1 input", ni)?;
            let x = &inputs[0];
            need_dtype(
                place,
                x.dtype == y.dtype && numeric(x.dtype),
                "reduce keeps a numeric type",
            )?;
            let r = x.shape.rank();
            if *axes == 0 || *axes >> r != 0 {
                return Err(bad_attr("reduce axes out of range"));
            }
            let mut dims = [0usize; MAX_RANK];
            let mut n = 0;
            for i in 0..r {
                if axes & (1 << i) != 0 {
                    if *keep_dims {
                        dims[n] = 1;
                        n += 1;
                    }
                } else {
                    dims[n] = x.shape.dim(i);
                    n += 1;
                }
            }
            need(
                place,
                Shape::new(&dims[..n]) == Some(y.shape),
                "reduce output shape",
            )?;
        }
        Op::Pool(p) => {
            arity(place, ni == 1, "1 input", ni)?;
            let x = &inputs[0];
            need_dtype(
                place,
                plain_f32(x) && y.dtype == DType::F32,
                "pooling is f32",
            )?;
            need(place, x.shape.rank() == 4, "pooling needs [N,C,H,W]")?;
            if p.pads[0] >= p.kernel[0]
                || p.pads[2] >= p.kernel[0]
                || p.pads[1] >= p.kernel[1]
                || p.pads[3] >= p.kernel[1]
            {
                return Err(bad_attr("pool padding must be smaller than the window"));
            }
            let d = x.shape.dims();
            // Floor or ceil mode: the output may hold one more window if it starts inside the input.
            let ok_axis = |i: usize, out: u32| -> bool {
                let Some(fl) = window_out(
                    d[2 + i],
                    p.kernel[i],
                    p.stride[i],
                    p.pads[i],
                    p.pads[i + 2],
                    1,
                ) else {
                    return false;
                };
                let (out, fl) = (out as u64, fl as u64);
                out == fl
                    || (out == fl + 1
                        && (out - 1) * p.stride[i] as u64 <= d[2 + i] as u64 + p.pads[i] as u64 - 1)
            };
            let yd = y.shape.dims();
            need(
                place,
                y.shape.rank() == 4 && yd[0] == d[0] && yd[1] == d[1],
                "pool output shape",
            )?;
            need(
                place,
                ok_axis(0, yd[2]) && ok_axis(1, yd[3]),
                "pool output spatial size",
            )?;
        }
        Op::Reshape => {
            arity(place, ni == 1, "1 input", ni)?;
            need_dtype(place, inputs[0].dtype == y.dtype, "reshape keeps the type")?;
            need(
                place,
                inputs[0].shape.numel() == y.shape.numel(),
                "reshape keeps the element count",
            )?;
        }
        Op::Transpose { perm } => {
            arity(place, ni == 1, "1 input", ni)?;
            let x = &inputs[0];
            need_dtype(place, x.dtype == y.dtype, "transpose keeps the type")?;
            let r = x.shape.rank();
            need(place, y.shape.rank() == r, "transpose keeps the rank")?;
            let mut seen = 0u32;
            for i in 0..r {
                let p = perm[i] as usize;
                if p >= r || seen & (1 << p) != 0 {
                    return Err(bad_attr("transpose permutation"));
                }
                seen |= 1 << p;
                need(
                    place,
                    y.shape.dim(i) == x.shape.dim(p),
                    "transpose output shape",
                )?;
            }
        }
        Op::Concat { axis } => {
            arity(place, ni >= 1, "at least 1 input", ni)?;
            let ax = *axis as usize;
            let r = y.shape.rank();
            if ax >= r {
                return Err(bad_attr("concat axis out of range"));
            }
            let mut total = 0usize;
            for t in inputs {
                need_dtype(place, t.dtype == y.dtype, "concat inputs share the type")?;
                need(place, t.shape.rank() == r, "concat inputs share the rank")?;
                for i in 0..r {
                    if i != ax {
                        need(
                            place,
                            t.shape.dim(i) == y.shape.dim(i),
                            "concat off-axis dims",
                        )?;
                    }
                }
                total += t.shape.dim(ax);
            }
            need(place, total == y.shape.dim(ax), "concat output size")?;
        }
        Op::Slice { starts, steps } => {
            arity(place, ni == 1, "1 input", ni)?;
            let x = &inputs[0];
            need_dtype(place, x.dtype == y.dtype, "slice keeps the type")?;
            let r = x.shape.rank();
            need(place, y.shape.rank() == r, "slice keeps the rank")?;
            for i in 0..r {
                let (n_in, n_out) = (x.shape.dim(i) as i64, y.shape.dim(i) as i64);
                let (s, st) = (starts[i] as i64, steps[i] as i64);
                if st == 0 {
                    return Err(bad_attr("slice step is zero"));
                }
                if n_out > 0 {
                    let last = s + (n_out - 1) * st;
                    if s < 0 || s >= n_in || last < 0 || last >= n_in {
                        return Err(bad_attr("slice window outside the input"));
                    }
                }
            }
        }
        Op::Gather { axis } => {
            arity(place, ni == 2, "2 inputs (data, indices)", ni)?;
            let (d, idx) = (&inputs[0], &inputs[1]);
            need_dtype(place, d.dtype == y.dtype, "gather keeps the data type")?;
            need_dtype(
                place,
                matches!(idx.dtype, DType::I64 | DType::I32),
                "gather indices are i64/i32",
            )?;
            let ax = *axis as usize;
            if ax >= d.shape.rank() {
                return Err(bad_attr("gather axis out of range"));
            }
            let mut dims = [0usize; MAX_RANK];
            let mut n = 0usize;
            let total = d.shape.rank() - 1 + idx.shape.rank();
            need(place, total <= MAX_RANK, "gather output rank")?;
            for i in 0..ax {
                dims[n] = d.shape.dim(i);
                n += 1;
            }
            for &v in idx.shape.dims() {
                dims[n] = v as usize;
                n += 1;
            }
            for i in ax + 1..d.shape.rank() {
                dims[n] = d.shape.dim(i);
                n += 1;
            }
            need(
                place,
                Shape::new(&dims[..n]) == Some(y.shape),
                "gather output shape",
            )?;
        }
        Op::Where => {
            arity(place, ni == 3, "3 inputs (cond, a, b)", ni)?;
            let (c, a, b) = (&inputs[0], &inputs[1], &inputs[2]);
            need_dtype(place, c.dtype == DType::Bool, "where condition is bool")?;
            need_dtype(
                place,
                a.dtype == b.dtype && a.dtype == y.dtype,
                "where branches share the type",
            )?;
            let s =
                broadcast_shapes(&c.shape, &a.shape).and_then(|s| broadcast_shapes(&s, &b.shape));
            need(place, s == Some(y.shape), "where output shape")?;
        }
        Op::Cast => {
            arity(place, ni == 1, "1 input", ni)?;
            need(place, inputs[0].shape == y.shape, "cast keeps the shape")?;
            need_dtype(
                place,
                inputs[0].dtype != DType::F16 && y.dtype != DType::F16,
                "cast of f16 activations",
            )?;
        }
        Op::IsNan => {
            arity(place, ni == 1, "1 input", ni)?;
            need_dtype(
                place,
                plain_f32(&inputs[0]) && y.dtype == DType::Bool,
                "is-nan maps f32 to bool",
            )?;
            need(place, inputs[0].shape == y.shape, "is-nan keeps the shape")?;
        }
        Op::Expand => {
            arity(place, ni == 1, "1 input", ni)?;
            need_dtype(place, inputs[0].dtype == y.dtype, "expand keeps the type")?;
            need(
                place,
                broadcast_shapes(&inputs[0].shape, &y.shape) == Some(y.shape),
                "expand output shape",
            )?;
        }
    }
    Ok(())
}

fn numeric(d: DType) -> bool {
    matches!(d, DType::F32 | DType::I64 | DType::I32)
}

fn check_bias(place: Place, bias: Option<&TensorMeta>, n: usize) -> Result<(), FormatError> {
    if let Some(b) = bias {
        need_dtype(place, plain_f32(b), "bias must be plain f32")?;
        need(
            place,
            b.shape.numel() == n,
            "bias length != output channels",
        )?;
    }
    Ok(())
}
