//! The crate's error type.

use core::fmt;

/// Result alias used by every fallible function of this crate.
pub type Result<T> = core::result::Result<T, QuantError>;

/// Why a compression routine refused its input.
///
/// Every variant names the offending parameter so that the CLI can print it as is.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantError {
    /// A tensor, a dimension or a list that must not be empty is empty (or a dimension is 0).
    EmptyInput {
        /// Which input.
        what: &'static str,
    },
    /// A slice does not have the length its dimensions imply.
    ShapeMismatch {
        /// Which input.
        what: &'static str,
        /// Length implied by the other parameters.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// A bit width outside the supported range.
    BitsOutOfRange {
        /// Requested bits.
        bits: u32,
        /// Smallest accepted.
        min: u32,
        /// Largest accepted.
        max: u32,
    },
    /// A group size that is zero or does not divide the dimension it runs along.
    InvalidGroup {
        /// Requested group size.
        group: usize,
        /// Length of the dimension the groups run along.
        dim: usize,
    },
    /// An N:M sparsity pattern that is not `1 <= N <= M <= 16` or where `M` does not divide `k`.
    InvalidNm {
        /// Weights kept per block.
        n: usize,
        /// Block length.
        m: usize,
        /// Length of the rows the blocks run along.
        k: usize,
    },
    /// A rank that is 0 or larger than `min(n, k)`, or a rank budget that leaves rank 0.
    InvalidRank {
        /// Requested (or implied) rank.
        rank: usize,
        /// Largest possible rank.
        max: usize,
    },
    /// A real-valued parameter outside its allowed range (fractions, exponents, damping...).
    OutOfRange {
        /// Which parameter.
        what: &'static str,
        /// The value received.
        value: f64,
        /// Human-readable accepted range.
        allowed: &'static str,
    },
    /// An input holds NaN or infinity (or a negative value where weights must be `>= 0`).
    NonFinite {
        /// Which input.
        what: &'static str,
    },
    /// Two statistics objects (or a statistic and a tensor) disagree on the channel count or on
    /// whether a Gram matrix is kept.
    Incompatible {
        /// What disagrees.
        what: &'static str,
    },
    /// A scale does not fit the storage type (f16 overflows above 65504).
    ScaleOverflow {
        /// The scale that would be needed.
        scale: f64,
    },
    /// A matrix factorisation failed (e.g. Cholesky of a matrix that is not positive definite
    /// even after damping, or SVD that did not converge).
    Linalg {
        /// What failed.
        what: &'static str,
    },
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantError::EmptyInput { what } => write!(f, "{what} is empty"),
            QuantError::ShapeMismatch {
                what,
                expected,
                got,
            } => {
                write!(f, "{what} has length {got}, expected {expected}")
            }
            QuantError::BitsOutOfRange { bits, min, max } => {
                write!(
                    f,
                    "{bits} bits is outside the supported range {min}..={max}"
                )
            }
            QuantError::InvalidGroup { group, dim } => {
                write!(f, "group size {group} must be > 0 and divide {dim}")
            }
            QuantError::InvalidNm { n, m, k } => write!(
                f,
                "{n}:{m} sparsity needs 1 <= N <= M <= 16 and M dividing k = {k}"
            ),
            QuantError::InvalidRank { rank, max } => {
                write!(f, "rank {rank} is not in 1..={max}")
            }
            QuantError::OutOfRange {
                what,
                value,
                allowed,
            } => {
                write!(f, "{what} = {value} is outside {allowed}")
            }
            QuantError::NonFinite { what } => {
                write!(
                    f,
                    "{what} contains NaN, infinity or an invalid negative value"
                )
            }
            QuantError::Incompatible { what } => write!(f, "incompatible inputs: {what}"),
            QuantError::ScaleOverflow { scale } => {
                write!(f, "scale {scale} does not fit in f16 (max 65504)")
            }
            QuantError::Linalg { what } => write!(f, "linear algebra failure: {what}"),
        }
    }
}

impl std::error::Error for QuantError {}
