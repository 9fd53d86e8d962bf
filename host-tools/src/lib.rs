//! The edgetune host tools: ONNX import through tract, graph passes, arena planning, packing to
//! `.etm`, and the `edgetune` command line (inspect, run, eval, bench, demo).

pub mod commands;
pub mod compress;
pub mod finetune;
pub mod import;
pub mod ir;
pub mod metrics;
pub mod model_file;
pub mod npy;
pub mod pack;
pub mod passes;
pub mod plot;
pub mod runner;
pub mod zolog;
