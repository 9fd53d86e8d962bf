//! Executes edgetune `.etm` models in place, in a caller-provided arena, without a heap.
//!
//! The same code runs on a host (where `edgetune eval` measures it) and on a microcontroller.
//! [`Model::from_bytes`] validates the file once; a [`Session`] then runs it in an arena whose
//! size the model states.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

pub mod adapter;
pub mod error;
mod exec;
pub mod kernels;
pub mod math;
pub mod session;
pub mod store;
pub mod train;

pub use edgetune_core::{FormatError, Model};
pub use error::RunError;
pub use session::{Elem, Session, ARENA_ALIGN};
