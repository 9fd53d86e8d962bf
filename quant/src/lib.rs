//! Compression algorithms for edgetune, on plain `f32` tensors.
//!
//! This crate knows nothing about the `.etm` file format: it turns weight matrices (and the
//! calibration statistics of their inputs) into codes, scales, codebooks, masks and low-rank
//! factors. The host CLI packs those into the format's encodings.
//!
//! # Conventions
//!
//! * A weight matrix is a row-major `[n_out][k_in]` slice `w: &[f32]` with `w.len() == n * k`:
//!   one row per output channel, `w[r * k + c]` multiplies input channel `c`.
//! * Groups (int4 scales, ternary/binary scales, N:M patterns) run **along `k`**, inside a row.
//! * Activations are row-major `[samples][k]`.
//! * "Importance" is a per-input-column weight of length `k` (typically mean x², see
//!   [`stats::ActStats::mean_sq`]); an error `Σ_rc imp[c]·(w[r][c] − ŵ[r][c])²` is what the
//!   importance-aware encoders minimise. It is the diagonal of the proxy loss
//!   `‖(W − Ŵ)Xᵀ‖²` that [`gptq`] and the activation-aware [`lowrank`] variants minimise in full.
//! * Scales that the format stores as f16 are returned already rounded to f16
//!   ([`scalar::round_to_f16`]), so `dequantize()` here is bit-for-bit what the runtime computes
//!   (up to its f32 summation order).
//! * Bad parameters return a [`QuantError`]; nothing in this crate panics on user input.
//!
//! # Modules
//!
//! | module | what |
//! |---|---|
//! | [`stats`] | calibration statistics: Σx², Σ\|x\|, count, optional Gram matrix XᵀX |
//! | [`kmeans`] | weighted 1-D k-means and scalar codebooks (palettization) |
//! | [`scalar`] | int8 per row, int4 per group with importance-weighted scale search, f16 rounding |
//! | [`ternary`] | ternary (TWN / BitNet absmean, chosen per group) and binary per group |
//! | [`lowrank`] | truncated SVD, ASVD, SVD-LLM |
//! | [`prune`] | magnitude, Wanda, N:M, structured output channels |
//! | [`gptq`] | error-compensating quantization with any per-column quantizer |
//! | [`metrics`] | relative Frobenius and activation-space errors |
//! | [`rng`] | the small deterministic generator used for seeding |
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod encode;
mod error;
pub mod gptq;
pub mod kmeans;
pub mod lowrank;
pub mod metrics;
pub mod prune;
pub mod rng;
pub mod scalar;
pub mod stats;
pub mod ternary;
mod util;

pub use error::{QuantError, Result};
