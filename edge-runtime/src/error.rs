//! Errors a session reports: caller mistakes and data-dependent failures.

use core::fmt;

/// Why a session could not be set up or run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunError {
    /// The arena is smaller than the model's plan.
    ArenaTooSmall {
        /// Bytes the model needs.
        needed: u64,
        /// Bytes given.
        given: u64,
    },
    /// The arena does not start at a 16-byte aligned address.
    ArenaMisaligned,
    /// No graph input or output with this index.
    NoSuchTensor {
        /// The index asked for.
        index: usize,
    },
    /// The caller's buffer has the wrong element type for this input or output.
    WrongDType {
        /// Graph input/output index.
        index: usize,
        /// The tensor's element type.
        expected: edgetune_core::DType,
    },
    /// The caller's buffer has the wrong number of elements.
    WrongLength {
        /// Graph input/output index.
        index: usize,
        /// Elements the tensor holds.
        expected: usize,
        /// Elements given.
        found: usize,
    },
    /// `run_range` asked to start mid-model on a plan that does not keep earlier results.
    NotResumable {
        /// The requested first op.
        op: u32,
    },
    /// A gather index (from input data) is outside the gathered axis.
    IndexOutOfRange {
        /// Op position in execution order.
        op: u32,
        /// The offending index.
        index: i64,
        /// Size of the gathered axis.
        dim: usize,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RunError::ArenaTooSmall { needed, given } => {
                write!(
                    f,
                    "arena too small: the model needs {needed} bytes, {given} given"
                )
            }
            RunError::ArenaMisaligned => write!(f, "arena must start at a 16-byte aligned address"),
            RunError::NoSuchTensor { index } => write!(f, "no graph input/output #{index}"),
            RunError::WrongDType { index, expected } => {
                write!(
                    f,
                    "graph tensor #{index} holds {}, not the type given",
                    expected.name()
                )
            }
            RunError::WrongLength {
                index,
                expected,
                found,
            } => {
                write!(
                    f,
                    "graph tensor #{index} holds {expected} elements, {found} given"
                )
            }
            RunError::NotResumable { op } => write!(
                f,
                "cannot resume at op #{op}: the model was not planned to keep earlier results (pack with resumable_from)"
            ),
            RunError::IndexOutOfRange { op, index, dim } => {
                write!(
                    f,
                    "op #{op}: gather index {index} outside an axis of size {dim}"
                )
            }
        }
    }
}

impl core::error::Error for RunError {}
