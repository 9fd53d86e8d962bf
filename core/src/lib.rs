//! The edgetune model contract: the `.etm` file format, the op set and their validation.
//!
//! `no_std` and allocation-free for reading, so the same code checks a model on a host and on a
//! microcontroller; the writer is behind the `alloc` feature. The byte layout is documented in
//! `core/FORMAT.md`.
#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod adapter;
pub mod error;
pub mod format;
pub mod layout;
pub mod model;
pub mod ops;
pub mod tensor;
#[cfg(feature = "alloc")]
pub mod writer;

pub use error::{FormatError, Place};
pub use model::{IoInfo, Model, OpInfo, TensorInfo};
pub use ops::{ActKind, Activation, BinaryKind, Op, OpCode, ReduceKind, Storage, TensorMeta};
pub use tensor::{DType, Encoding, Shape, MAX_RANK, PANEL};
