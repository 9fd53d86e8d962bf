//! Build-time configuration of the firmware image.
//!
//! - Puts the board's memory map (`memory-<board>.x`) where cortex-m-rt's `link.x` finds it, as `memory.x`.
//! - Generates `$OUT_DIR/config.rs` (included by `src/hooks.rs`) from environment variables:
//!
//! | variable               | default                   | meaning                                        |
//! |------------------------|---------------------------|------------------------------------------------|
//! | `EDGETUNE_MODEL`       | `data/placeholder.etm`    | `.etm` file embedded in flash, 64-byte aligned |
//! | `EDGETUNE_TEST_DATA`   | `data/placeholder.bin`    | test inputs: f32 little-endian, sample after sample |
//! | `EDGETUNE_TEST_LABELS` | `data/placeholder.bin`    | test labels: one byte per sample               |
//! | `EDGETUNE_TRAIN_DATA`  | `data/placeholder.bin`    | fine-tuning inputs, as the test inputs         |
//! | `EDGETUNE_TRAIN_LABELS`| `data/placeholder.bin`    | fine-tuning labels, one byte per sample        |
//! | `EDGETUNE_ADAPTER`     | `data/placeholder.bin`    | initial `.eta` adapter: what fine-tuning trains |
//! | `EDGETUNE_ADAPTER_VALUES` | `0`                    | f32 values in that adapter (static buffer size) |
//! | `EDGETUNE_ADAPTER_WORKSPACE` | `0`                 | f32 workspace its LoRA entries need            |
//! | `EDGETUNE_FINETUNE`    | `steps=0`                 | `steps=,batch=,lr=,eps=,wd=,clip=,seed=` of the zeroth-order run |
//! | `EDGETUNE_ARENA_BYTES` | `65536`                   | size of the static activation arena            |
//! | `EDGETUNE_ARENA_IN`    | `ram`                     | `ram` (SSRAM2&3, .uninit) or `psram` (16 MiB)  |
//! | `EDGETUNE_FW_FAULT`    | (none)                    | test the runner: `fail`, `panic`, `stack-overflow`, `usage-fault` or `hang` |
//!
//! Relative paths are taken from this folder (boards/run-qemu.sh passes absolute ones).
//! Sizes accept a plain number or a `K`/`M` suffix (binary units).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const MODEL_VAR: &str = "EDGETUNE_MODEL";
const TEST_DATA_VAR: &str = "EDGETUNE_TEST_DATA";
const ARENA_VAR: &str = "EDGETUNE_ARENA_BYTES";
const ARENA_IN_VAR: &str = "EDGETUNE_ARENA_IN";
const FAULT_VAR: &str = "EDGETUNE_FW_FAULT";
const FAULTS: [&str; 6] = ["", "fail", "panic", "stack-overflow", "usage-fault", "hang"];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());

    // One memory map per board (cortex-m-rt's link.x includes `memory.x`).
    let stm32f407 = env::var_os("CARGO_FEATURE_STM32F407").is_some();
    let memory = if stm32f407 {
        "memory-stm32f407.x"
    } else {
        "memory-mps2-an386.x"
    };
    fs::copy(manifest.join(memory), out.join("memory.x")).expect("copy the memory map to OUT_DIR");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed={memory}");

    let (model, model_given) = input_file(&manifest, MODEL_VAR, "data/placeholder.etm");
    let (data, data_given) = input_file(&manifest, TEST_DATA_VAR, "data/placeholder.bin");
    let (test_labels, _) = input_file(&manifest, "EDGETUNE_TEST_LABELS", "data/placeholder.bin");
    let (train, train_given) = input_file(&manifest, "EDGETUNE_TRAIN_DATA", "data/placeholder.bin");
    let (train_labels, _) = input_file(&manifest, "EDGETUNE_TRAIN_LABELS", "data/placeholder.bin");
    let (adapter, adapter_given) =
        input_file(&manifest, "EDGETUNE_ADAPTER", "data/placeholder.bin");
    let values = size_var("EDGETUNE_ADAPTER_VALUES", 0);
    let workspace = size_var("EDGETUNE_ADAPTER_WORKSPACE", 0);
    let adapter_bytes = if adapter_given {
        fs::metadata(&adapter)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    } else {
        0
    };
    let ft = finetune_var();
    let arena = size_var(ARENA_VAR, 64 * 1024);
    println!("cargo:rerun-if-env-changed={ARENA_IN_VAR}");
    println!("cargo:rustc-check-cfg=cfg(edgetune_arena_psram)");
    let arena_in = env::var(ARENA_IN_VAR).unwrap_or_else(|_| "ram".into());
    match arena_in.as_str() {
        "ram" => {}
        "psram" => println!("cargo:rustc-cfg=edgetune_arena_psram"),
        other => fail(&format!(
            "{ARENA_IN_VAR}={other:?}: expected `ram` or `psram`"
        )),
    }
    let arena_limit = match (stm32f407, arena_in.as_str()) {
        (true, "psram") => fail(&format!("{ARENA_IN_VAR}=psram: the stm32f407 has no PSRAM")),
        (true, _) => 128 << 10,
        (false, "psram") => 16 << 20,
        (false, _) => (4 << 20) - (64 << 10),
    };
    if arena > arena_limit {
        fail(&format!(
            "{ARENA_VAR}={arena} does not fit in {arena_in} ({arena_limit} bytes)"
        ));
    }

    println!("cargo:rerun-if-env-changed={FAULT_VAR}");
    let fault = env::var(FAULT_VAR).unwrap_or_default();
    if !FAULTS.contains(&fault.as_str()) {
        fail(&format!(
            "{FAULT_VAR}={fault:?}: expected one of {:?}",
            &FAULTS[1..]
        ));
    }

    let config = format!(
        "// Generated by build.rs from the environment; see build.rs for the variables.\n\
         /// Path of the embedded model file.\n\
         pub const MODEL_PATH: &str = {model_path:?};\n\
         /// Whether `EDGETUNE_MODEL` was set (false: the placeholder is embedded).\n\
         pub const MODEL_GIVEN: bool = {model_given};\n\
         /// The embedded model, 64-byte aligned in flash.\n\
         pub static MODEL: &Aligned64<[u8]> = &Aligned64(*include_bytes!({model_path:?}));\n\
         /// Path of the embedded test data.\n\
         pub const TEST_DATA_PATH: &str = {data_path:?};\n\
         /// Whether `EDGETUNE_TEST_DATA` was set (false: the placeholder is embedded).\n\
         pub const TEST_DATA_GIVEN: bool = {data_given};\n\
         /// The embedded test data, 64-byte aligned in flash.\n\
         pub static TEST_DATA: &Aligned64<[u8]> = &Aligned64(*include_bytes!({data_path:?}));\n\
         /// Test labels, one byte per sample.\n\
         pub static TEST_LABELS: &Aligned64<[u8]> = &Aligned64(*include_bytes!({test_labels:?}));\n\
         /// Whether fine-tuning data (`EDGETUNE_TRAIN_DATA`) was given.\n\
         pub const TRAIN_GIVEN: bool = {train_given};\n\
         /// Fine-tuning inputs, f32 little-endian, sample after sample.\n\
         pub static TRAIN_DATA: &Aligned64<[u8]> = &Aligned64(*include_bytes!({train:?}));\n\
         /// Fine-tuning labels, one byte per sample.\n\
         pub static TRAIN_LABELS: &Aligned64<[u8]> = &Aligned64(*include_bytes!({train_labels:?}));\n\
         /// Whether an initial adapter (`EDGETUNE_ADAPTER`) was given.\n\
         pub const ADAPTER_GIVEN: bool = {adapter_given};\n\
         /// The initial `.eta` adapter.\n\
         pub static INITIAL_ADAPTER: &Aligned64<[u8]> = &Aligned64(*include_bytes!({adapter:?}));\n\
         /// Bytes of the adapter file (it keeps its length through training).\n\
         pub const ADAPTER_FILE_BYTES: usize = {adapter_bytes};\n\
         /// f32 values of the adapter.\n\
         pub const ADAPTER_VALUES: usize = {values};\n\
         /// f32 workspace of the adapter.\n\
         pub const ADAPTER_WORKSPACE: usize = {workspace};\n\
         /// Zeroth-order run: steps, samples per step, learning rate, eps, weight decay, clip, seed.\n\
         pub const FT_STEPS: u32 = {steps};\n\
         pub const FT_BATCH: usize = {batch};\n\
         pub const FT_LR: f32 = {lr:?};\n\
         pub const FT_EPS: f32 = {eps:?};\n\
         pub const FT_WD: f32 = {wd:?};\n\
         pub const FT_CLIP: f32 = {clip:?};\n\
         pub const FT_SEED: u64 = {seed};\n\
         /// Size of the static activation arena in bytes.\n\
         pub const ARENA_BYTES: usize = {arena};\n\
         /// Cargo profile this image was built with (`release` or `speed` in run-qemu.sh).\n\
         pub const BUILD_PROFILE: &str = {profile:?};\n\
         /// Optimisation level this image was built with.\n\
         pub const OPT_LEVEL: &str = {opt:?};\n\
         /// Deliberate failure to test the runner (`EDGETUNE_FW_FAULT`), empty for none.\n\
         pub const INJECT_FAULT: &str = {fault:?};\n",
        model_path = model.display().to_string(),
        data_path = data.display().to_string(),
        steps = ft.steps,
        batch = ft.batch,
        lr = ft.lr,
        eps = ft.eps,
        wd = ft.wd,
        clip = ft.clip,
        seed = ft.seed,
        profile = profile_name(&out),
        opt = env::var("OPT_LEVEL").unwrap_or_default(),
    );
    fs::write(out.join("config.rs"), config).expect("write config.rs");
}

/// The cargo profile being built. `PROFILE` only says `debug` or `release`, so take the name
/// from OUT_DIR instead: `<target-dir>/<triple>/<profile dir>/build/<pkg>-<hash>/out`.
fn profile_name(out: &Path) -> String {
    let dir = out
        .ancestors()
        .nth(3)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str());
    match dir {
        Some("debug") => "dev".into(),
        Some(name) => name.into(),
        None => env::var("PROFILE").unwrap_or_default(),
    }
}

/// The file named by `var`, or the default, as an absolute path; and whether `var` was set.
fn input_file(manifest: &Path, var: &str, default: &str) -> (PathBuf, bool) {
    println!("cargo:rerun-if-env-changed={var}");
    let (path, given) = match env::var_os(var) {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(default), false),
    };
    let path = if path.is_absolute() {
        path
    } else {
        manifest.join(path)
    };
    let path = path
        .canonicalize()
        .unwrap_or_else(|e| fail(&format!("{var}: cannot read {}: {e}", path.display())));
    println!("cargo:rerun-if-changed={}", path.display());
    (path, given)
}

/// The zeroth-order run `EDGETUNE_FINETUNE` asks for; its defaults are `edgetune finetune`'s.
struct Finetune {
    steps: u32,
    batch: usize,
    lr: f32,
    eps: f32,
    wd: f32,
    clip: f32,
    seed: u64,
}

fn finetune_var() -> Finetune {
    const VAR: &str = "EDGETUNE_FINETUNE";
    println!("cargo:rerun-if-env-changed={VAR}");
    let mut f = Finetune {
        steps: 0,
        batch: 16,
        lr: 1e-2,
        eps: 1e-3,
        wd: 0.0,
        clip: 5.0,
        seed: 0,
    };
    let text = env::var(VAR).unwrap_or_default();
    for kv in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || -> ! {
            fail(&format!(
                "{VAR}: {kv:?} is not key=number (steps, batch, lr, eps, wd, clip, seed)"
            ))
        };
        let Some((k, v)) = kv.split_once('=') else {
            bad()
        };
        fn num<T: std::str::FromStr>(v: &str, bad: impl Fn() -> T) -> T {
            v.parse().unwrap_or_else(|_| bad())
        }
        match k {
            "steps" => f.steps = num(v, || bad()),
            "batch" => f.batch = num(v, || bad()),
            "lr" => f.lr = num(v, || bad()),
            "eps" => f.eps = num(v, || bad()),
            "wd" => f.wd = num(v, || bad()),
            "clip" => f.clip = num(v, || bad()),
            "seed" => f.seed = num(v, || bad()),
            _ => bad(),
        }
    }
    if f.batch == 0 {
        fail(&format!("{VAR}: batch must be at least 1"));
    }
    f
}

fn size_var(var: &str, default: usize) -> usize {
    println!("cargo:rerun-if-env-changed={var}");
    let Ok(text) = env::var(var) else {
        return default;
    };
    let t = text.trim();
    let (digits, unit) = match t.as_bytes().last() {
        Some(b'K' | b'k') => (&t[..t.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&t[..t.len() - 1], 1 << 20),
        _ => (t, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .unwrap_or_else(|| {
            fail(&format!(
                "{var}={text:?}: expected a size like 65536, 64K or 1M"
            ))
        })
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
