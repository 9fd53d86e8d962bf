//! `edgetune flash`: build the firmware around a model and data, check that it fits the board,
//! run it (under QEMU for the emulated board), and check the board against the host: the same
//! test accuracy, and the adapter it fine-tuned bit for bit equal to a host run on the scalar
//! reference kernels.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser};
use edgetune_runtime::Model;

use super::finetune;
use super::{eval, Cli};
use crate::model_file::AlignedBytes;
use crate::npy::{self, Array, ArrayData};
use crate::runner::{HostAdapter, Ours};

/// `edgetune flash`.
#[derive(Args, Debug)]
pub struct FlashArgs {
    /// The `.etm` model (one sample per run: import or compress with batch 1).
    pub model: PathBuf,
    /// Target board (see `--list-boards`).
    #[arg(long, default_value = "qemu-mps2-an386")]
    pub board: String,
    /// Test inputs to embed: `name=x.npy` (f32, samples on the leading axis).
    #[arg(long = "data")]
    pub data: Option<String>,
    /// Test labels to embed (integers 0..=255, one per test sample).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Test samples to embed (the first N).
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Fine-tuning inputs to embed: `name=x.npy`.
    #[arg(long)]
    pub train: Option<String>,
    /// Fine-tuning labels.
    #[arg(long)]
    pub train_labels: Option<PathBuf>,
    /// Fine-tuning samples to embed (the first N).
    #[arg(long, default_value_t = 200)]
    pub train_count: usize,
    /// On-device zeroth-order run: `steps=N,batch=B,lr=,eps=,wd=,clip=,seed=` (defaults as
    /// `edgetune finetune`; batch 16).
    #[arg(long)]
    pub finetune: Option<String>,
    /// What fine-tuning trains (as `edgetune finetune --trainable`).
    #[arg(long, default_value = "bias,scales")]
    pub trainable: String,
    /// Layers LoRA adapts (as `edgetune finetune --lora-targets`).
    #[arg(long, default_value = "*")]
    pub lora_targets: String,
    /// Where to write the adapter the board saved.
    #[arg(long)]
    pub adapter_out: Option<PathBuf>,
    /// Flash budget in bytes (`1M`, `512K`), instead of the board's.
    #[arg(long, value_parser = parse_size)]
    pub flash_budget: Option<u64>,
    /// Static RAM budget in bytes, instead of the board's.
    #[arg(long, value_parser = parse_size)]
    pub ram_budget: Option<u64>,
    /// Build the image and print its sizes, do not run it.
    #[arg(long)]
    pub build_only: bool,
    /// Seconds the emulated board may run.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// The `boards/` folder of an edgetune checkout (default: the one this binary was built from).
    #[arg(long)]
    pub boards_dir: Option<PathBuf>,
    /// Folder for the bundle given to the firmware build (default: a temporary folder).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// A board edgetune builds firmware for, and what it offers.
#[derive(Debug, Clone, Copy)]
pub struct BoardSpec {
    /// Name for `--board`.
    pub name: &'static str,
    /// Flash for code, model and data, bytes.
    pub flash: u64,
    /// RAM for statics (arena, fine-tuning buffers), bytes; the stack has its own region.
    pub ram: u64,
    /// Whether edgetune runs it (under QEMU) or only builds the ELF for a flasher.
    pub emulated: bool,
}

/// The boards `--board` accepts.
pub const BOARDS: &[BoardSpec] = &[
    BoardSpec {
        name: "qemu-mps2-an386",
        // memory-mps2-an386.x: SSRAM1 less the 64 KiB adapter store; SSRAM2&3 less the stack.
        flash: (4 << 20) - (64 << 10),
        ram: (4 << 20) - (64 << 10),
        emulated: true,
    },
    BoardSpec {
        name: "stm32f407",
        // memory-stm32f407.x: flash sectors 0-9 (10-11 hold adapters); SRAM1+2 (CCM: stack).
        flash: 768 << 10,
        ram: 128 << 10,
        emulated: false,
    },
];

/// Flash kept for the runtime and firmware code in the estimate made before building; the
/// image's real size is checked again after the build.
pub const CODE_RESERVE: u64 = 256 << 10;

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, unit) = match t.as_bytes().last() {
        Some(b'K' | b'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&t[..t.len() - 1], 1 << 20),
        _ => (t, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{s:?}: expected a size like 65536, 64K or 1M"))
}

/// What the image needs, estimated from the model and data before anything is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Model bytes.
    pub model: u64,
    /// Embedded data and initial adapter bytes.
    pub data: u64,
    /// Activation arena bytes.
    pub arena: u64,
    /// Fine-tuning buffers: adapter values, workspace, one `.eta` file.
    pub trainer: u64,
}

impl Budget {
    /// Flash the image needs: model, data and [`CODE_RESERVE`].
    pub fn flash(&self) -> u64 {
        self.model + self.data + CODE_RESERVE
    }

    /// Static RAM the image needs: arena and fine-tuning buffers.
    pub fn ram(&self) -> u64 {
        self.arena + self.trainer
    }

    /// An error naming each budget exceeded and by how much.
    ///
    /// ```
    /// use edgetune_cli::commands::flash::Budget;
    /// let b = Budget { model: 900_000, data: 0, arena: 100_000, trainer: 0 };
    /// let e = b.check("tiny", 1 << 20, 64 << 10).unwrap_err().to_string();
    /// assert!(e.contains("RAM") && e.contains("34464 B over"), "{e}");
    /// assert!(b.check("big", 4 << 20, 1 << 20).is_ok());
    /// ```
    pub fn check(&self, board: &str, flash: u64, ram: u64) -> Result<()> {
        let mut over = Vec::new();
        if self.flash() > flash {
            over.push(format!(
                "flash: needs {} B (model {} B + data {} B + {} B kept for code) of {} B, {} B over",
                self.flash(),
                self.model,
                self.data,
                CODE_RESERVE,
                flash,
                self.flash() - flash
            ));
        }
        if self.ram() > ram {
            over.push(format!(
                "RAM: needs {} B (arena {} B + fine-tuning buffers {} B) of {} B, {} B over",
                self.ram(),
                self.arena,
                self.trainer,
                ram,
                self.ram() - ram
            ));
        }
        if !over.is_empty() {
            bail!(
                "the model does not fit {board}: {}; nothing was built",
                over.join("; ")
            );
        }
        Ok(())
    }
}

/// The first `count` samples of an f32 input, as little-endian bytes.
fn f32_samples(a: &Array, count: usize, per: usize, what: &str) -> Result<(Vec<u8>, Array)> {
    let ArrayData::F32(v) = &a.data else {
        bail!("{what}: f32 inputs expected, got {:?}", a.dtype())
    };
    if a.shape.iter().skip(1).product::<usize>() != per {
        bail!(
            "{what}: samples of {:?}, the model takes {per} values per sample",
            &a.shape[1..]
        );
    }
    let n = count.min(a.shape[0]);
    if n == 0 {
        bail!("{what}: no samples");
    }
    let vals = &v[..n * per];
    let mut shape = a.shape.clone();
    shape[0] = n;
    Ok((
        vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Array {
            shape,
            data: ArrayData::F32(vals.to_vec()),
        },
    ))
}

fn byte_labels(path: &Path, n: usize) -> Result<Vec<u8>> {
    let l = npy::read(path)?.to_i64();
    if l.len() < n {
        bail!("{}: {} labels for {n} samples", path.display(), l.len());
    }
    l[..n]
        .iter()
        .map(|&v| {
            u8::try_from(v).map_err(|_| anyhow!("{}: label {v} is outside 0..=255", path.display()))
        })
        .collect()
}

fn value_of(spec: &str) -> Result<&str> {
    spec.split_once('=')
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow!("{spec:?}: expected name=file.npy"))
}

/// The `--finetune` keys as `edgetune finetune` flags.
fn finetune_flags(spec: &str) -> Result<(Vec<String>, u32, usize)> {
    let (mut flags, mut steps, mut batch) = (Vec::new(), 0u32, 16usize);
    for kv in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--finetune {kv:?}: expected key=value")
        };
        match k {
            "steps" => steps = v.parse().with_context(|| format!("--finetune {kv}"))?,
            "batch" => batch = v.parse().with_context(|| format!("--finetune {kv}"))?,
            "lr" | "eps" | "wd" | "clip" | "seed" => {
                v.parse::<f64>()
                    .with_context(|| format!("--finetune {kv}"))?;
                flags.extend([format!("--{k}"), v.to_string()]);
            }
            _ => bail!("--finetune {k}: the keys are steps, batch, lr, eps, wd, clip, seed"),
        }
    }
    if batch == 0 {
        bail!("--finetune batch=0: at least one sample per step");
    }
    flags.extend([
        "--steps".into(),
        steps.to_string(),
        "--batch".into(),
        batch.to_string(),
    ]);
    Ok((flags, steps, batch))
}

/// What the firmware printed that the host checks.
#[derive(Debug, Default)]
struct Printed {
    inference_hits: Option<usize>,
    adapter: Vec<u8>,
}

fn parse_line(line: &str, p: &mut Printed) -> Result<()> {
    if let Some(rest) = line.strip_prefix("inference: accuracy ") {
        let hits = rest
            .split('/')
            .next()
            .and_then(|h| h.parse().ok())
            .ok_or_else(|| anyhow!("firmware printed {line:?}"))?;
        p.inference_hits = Some(hits);
    } else if let Some(hex) = line.strip_prefix("adapter-hex: ") {
        let hex = hex.trim();
        if hex.len() % 2 != 0 {
            bail!("firmware printed an odd-length adapter line");
        }
        for i in (0..hex.len()).step_by(2) {
            p.adapter.push(
                u8::from_str_radix(&hex[i..i + 2], 16)
                    .with_context(|| format!("adapter line {hex:?}"))?,
            );
        }
    }
    Ok(())
}

/// Runs the command.
pub fn run(a: &FlashArgs) -> Result<()> {
    let board = BOARDS.iter().find(|b| b.name == a.board).ok_or_else(|| {
        anyhow!(
            "--board {}: edgetune builds for {}",
            a.board,
            BOARDS.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
        )
    })?;
    let bytes = AlignedBytes::read(&a.model)?;
    let model =
        Model::from_bytes(bytes.as_bytes()).map_err(|e| anyhow!("{}: {e}", a.model.display()))?;
    let (flash, ram) = (
        a.flash_budget.unwrap_or(board.flash),
        a.ram_budget.unwrap_or(board.ram),
    );
    // The model alone first: a model that cannot fit is told so before anything else.
    let arena = model.arena_bytes().div_ceil(64) * 64;
    Budget {
        model: bytes.as_bytes().len() as u64,
        data: 0,
        arena,
        trainer: 0,
    }
    .check(board.name, flash, ram)?;
    let (Some(input), Some(_)) = (model.input(0), model.output(0)) else {
        bail!(
            "{}: the firmware needs a model with an input and an output",
            a.model.display()
        )
    };
    if model.inputs().count() != 1 {
        bail!(
            "{}: the firmware feeds one input, this model has {}",
            a.model.display(),
            model.inputs().count()
        );
    }
    let shape = model.tensor(input.tensor).meta.shape;
    if shape.dim(0) != 1 {
        bail!(
            "{}: the firmware runs one sample at a time; import or compress with --input {}=1x...",
            a.model.display(),
            input.name
        );
    }
    let per = shape.numel();

    let work = match &a.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("edgetune-flash-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let work = std::fs::canonicalize(&work)?;
    let mut env: Vec<(&str, String)> = vec![(
        "EDGETUNE_MODEL",
        std::fs::canonicalize(&a.model)?.display().to_string(),
    )];
    let put = |name: &str, data: &[u8]| -> Result<String> {
        let p = work.join(name);
        std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
        Ok(p.display().to_string())
    };

    let mut budget = Budget {
        model: bytes.as_bytes().len() as u64,
        data: 0,
        arena,
        trainer: 0,
    };
    let mut test = None;
    if let Some(spec) = &a.data {
        let Some(lp) = &a.labels else {
            bail!("--data needs --labels")
        };
        let (xb, x) = f32_samples(
            &npy::read(Path::new(value_of(spec)?))?,
            a.count,
            per,
            "--data",
        )?;
        let y = byte_labels(lp, x.shape[0])?;
        budget.data += (xb.len() + y.len()) as u64;
        env.push(("EDGETUNE_TEST_DATA", put("test_x.bin", &xb)?));
        env.push(("EDGETUNE_TEST_LABELS", put("test_y.bin", &y)?));
        test = Some((x, y));
    }
    let mut train = None;
    if let Some(spec) = &a.finetune {
        let (Some(tx), Some(ty)) = (&a.train, &a.train_labels) else {
            bail!("--finetune needs --train and --train-labels")
        };
        let (flags, steps, batch) = finetune_flags(spec)?;
        let (xb, x) = f32_samples(
            &npy::read(Path::new(value_of(tx)?))?,
            a.train_count,
            per,
            "--train",
        )?;
        let y = byte_labels(ty, x.shape[0])?;
        let (entries, values) =
            finetune::build_entries(&model, &a.trainable, &a.lora_targets, seed_of(&flags))?;
        let host = HostAdapter::new(&model, entries, values);
        let eta = host.to_bytes(&model)?;
        budget.data += (xb.len() + y.len() + eta.len()) as u64;
        budget.trainer =
            (host.values.len() * 4 + host.work.len() * 4 + eta.len().div_ceil(64) * 64) as u64;
        env.push(("EDGETUNE_TRAIN_DATA", put("train_x.bin", &xb)?));
        env.push(("EDGETUNE_TRAIN_LABELS", put("train_y.bin", &y)?));
        env.push(("EDGETUNE_ADAPTER", put("initial.eta", &eta)?));
        env.push(("EDGETUNE_ADAPTER_VALUES", host.values.len().to_string()));
        env.push(("EDGETUNE_ADAPTER_WORKSPACE", host.work.len().to_string()));
        let fw_spec: Vec<String> = flags
            .chunks(2)
            .map(|kv| format!("{}={}", kv[0].trim_start_matches('-'), kv[1]))
            .collect();
        env.push(("EDGETUNE_FINETUNE", fw_spec.join(",")));
        train = Some((x, y, flags, steps, batch));
    }
    env.push(("EDGETUNE_ARENA_BYTES", budget.arena.max(64).to_string()));

    // Before anything is built: does it fit?
    budget.check(board.name, flash, ram)?;
    println!(
        "flash: {} fits: flash {} B of {flash} B (model {} B, data {} B, {} B kept for code), static RAM {} B of {ram} B (arena {} B, fine-tuning {} B)",
        board.name,
        budget.flash(),
        budget.model,
        budget.data,
        CODE_RESERVE,
        budget.ram(),
        budget.arena,
        budget.trainer
    );

    let boards_dir = a
        .boards_dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards"));
    let script = boards_dir.join("run-qemu.sh");
    if !script.is_file() {
        bail!(
            "{}: not found; pass --boards-dir (the boards/ folder of an edgetune checkout)",
            script.display()
        );
    }
    let mut cmd = Command::new("bash");
    let firmware_board = board.name.trim_start_matches("qemu-");
    cmd.arg(&script)
        .arg("--board")
        .arg(firmware_board)
        .arg("--timeout")
        .arg(a.timeout.to_string());
    if a.build_only || !board.emulated {
        cmd.arg("--no-run");
    }
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", script.display()))?;
    let mut printed = Printed::default();
    let (mut static_ram, mut image_flash) = (None, None);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        if !line.starts_with("adapter-hex: ") {
            println!("{line}");
        }
        let number_after = |key: &str| {
            line.split(key)
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|r| r.parse::<u64>().ok())
        };
        if line.starts_with("run-qemu: flash ") {
            image_flash = number_after("run-qemu: flash ");
            static_ram = number_after("static RAM ");
        }
        parse_line(&line, &mut printed)?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    if let Some(r) = static_ram.filter(|&r| r > ram) {
        bail!(
            "the built image's static RAM is {r} B, over the {ram} B budget by {} B",
            r - ram
        );
    }
    if let Some(f) = image_flash.filter(|&f| f > flash) {
        bail!(
            "the built image takes {f} B of flash, over the {flash} B budget by {} B",
            f - flash
        );
    }
    if !board.emulated {
        println!("flash: built for {}; flash it with `probe-rs run --chip STM32F407VGTx <the ELF above>`, its log is on USART2 (PA2, 115200 8N1)", board.name);
        return Ok(());
    }
    if a.build_only {
        return Ok(());
    }

    if let Some((x, y)) = &test {
        let on_board = printed
            .inference_hits
            .ok_or_else(|| anyhow!("the firmware printed no inference accuracy"))?;
        let mut ours = Ours::load(&a.model)?;
        let labels: Vec<i64> = y.iter().map(|&l| l as i64).collect();
        let acc = eval::evaluate(
            &mut ours,
            None,
            std::slice::from_ref(x),
            Some(&labels),
            None,
        )?
        .accuracy
        .unwrap_or(0.0);
        let on_host = (acc * y.len() as f64).round() as usize;
        if on_host != on_board {
            bail!(
                "the board got {on_board}/{} right, the host runtime {on_host}/{}",
                y.len(),
                y.len()
            );
        }
        println!("flash: host runtime on the same {} samples: {on_host}/{} correct, identical to the board", y.len(), y.len());
    }
    if let Some((x, y, flags, steps, batch)) = train {
        if printed.adapter.is_empty() {
            bail!("the firmware printed no adapter");
        }
        let host_eta = host_reference_run(
            &a.model,
            &model,
            &x,
            &y,
            &flags,
            &a.trainable,
            &a.lora_targets,
            &work,
        )?;
        if let Some(out) = &a.adapter_out {
            finetune::write_durably(out, &printed.adapter)?;
        }
        if host_eta != printed.adapter {
            bail!(
                "the board's adapter ({} B) differs from the host's reference-kernel run ({} B) with the same seed, data and {steps} steps",
                printed.adapter.len(),
                host_eta.len()
            );
        }
        println!("flash: the board's adapter ({} B, {steps} steps of {batch} samples) is bit-identical to the host's reference-kernel run", host_eta.len());
    }
    Ok(())
}

fn seed_of(flags: &[String]) -> u64 {
    flags
        .chunks(2)
        .find(|kv| kv[0] == "--seed")
        .and_then(|kv| kv[1].parse().ok())
        .unwrap_or(0)
}

/// `edgetune finetune` on the host with the scalar reference kernels, on the embedded subset.
#[allow(clippy::too_many_arguments)]
fn host_reference_run(
    path: &Path,
    model: &Model<'_>,
    x: &Array,
    y: &[u8],
    flags: &[String],
    trainable: &str,
    lora_targets: &str,
    work: &Path,
) -> Result<Vec<u8>> {
    // Parsed as `edgetune finetune` would parse them, so the host run gets exactly its defaults;
    // the data are the embedded subset in memory, so the file arguments are never read.
    let out = work.join("host.eta");
    let mut argv: Vec<String> = ["edgetune", "finetune"].map(String::from).to_vec();
    argv.push(path.display().to_string());
    argv.extend([
        "--train".into(),
        "x=in-memory".into(),
        "--labels".into(),
        "in-memory".into(),
        "--reference-kernels".into(),
        "--quiet".into(),
    ]);
    argv.extend([
        "--trainable".into(),
        trainable.into(),
        "--lora-targets".into(),
        lora_targets.into(),
        "-o".into(),
        out.display().to_string(),
    ]);
    argv.extend(flags.iter().cloned());
    let cli = Cli::try_parse_from(argv)?;
    let super::Command::Finetune(fa) = cli.command else {
        bail!("internal: not a finetune command")
    };
    let (entries, values) =
        finetune::build_entries(model, &fa.trainable, &fa.lora_targets, fa.seed)?;
    let mut host = HostAdapter::new(model, entries, values);
    let cfg = finetune::zo_config(&fa);
    let labels: Vec<i64> = y.iter().map(|&l| l as i64).collect();
    finetune::train_zo(
        model,
        &mut host,
        &cfg,
        &fa,
        std::slice::from_ref(x),
        Some(&labels),
        None,
        None,
    )?;
    host.to_bytes(model)
}
