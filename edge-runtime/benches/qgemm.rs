//! Compressed-weight products against the f32 GEMM on MiniLM's feed-forward shapes
//! (W = 1536×384 and 384×1536), at m = 1 (GEMV, one token) and m = 32, with
//! `Kernels::best()` on one thread.
//!
//! `cargo bench -p edgetune-runtime --features std --bench qgemm` (the `std` feature turns on
//! runtime CPU detection). Criterion measures each kernel; a table of times and speed-ups over
//! the f32 GEMM (f32 time / kernel time) is printed at the end, then a GEMV table with "cold"
//! weights: each product reads a different copy of the weight from a working set larger than
//! the last-level cache, as a model with many layers does (the first table keeps one copy hot). `QGEMM_BENCH_QUICK=1` prints only
//! the table; `QGEMM_BENCH_ONLY=<text>` keeps only the kernels whose name contains it.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgetune_core::layout::{
    pack_block, QBlockLayout, SparseLayout, BLOCK, QFLAG_INT8_ACTIVATIONS, QFLAG_ROW_TILES,
};
use edgetune_core::Activation;
use edgetune_runtime::kernels::gemm;
use edgetune_runtime::kernels::linear::{linear, Weights};
use edgetune_runtime::kernels::qgemm::{q8_row_bytes, QWeights, SparseWeights};
use edgetune_runtime::kernels::Kernels;
use half::f16;

/// (n, k): W is n×k.
const SHAPES: [(usize, usize); 2] = [(1536, 384), (384, 1536)];
const MS: [usize; 2] = [1, 32];

/// Deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// How a block-quantized weight is built.
#[derive(Clone, Copy)]
struct QSpec {
    bits: usize,
    /// 0 = whole row.
    group: usize,
    /// 0 = one table for the tensor.
    rpt: usize,
    int8: bool,
    /// Table values for code c.
    table: fn(&mut Rng, usize) -> f32,
    /// Codes drawn (below `2^bits`; ternary weights use three of the four 2-bit codes).
    codes: usize,
    /// Rows interleaved by tiles of 16 (`QFLAG_ROW_TILES`).
    tiles: bool,
}

/// Values starting on a 64-byte line, as a model's weight sections are in a `.etm` mapped from
/// a file or placed in flash (a plain `Vec` may start mid-line, and then every 64-byte load of
/// a weight row straddles two lines).
struct Lined<T> {
    buf: Vec<T>,
    at: usize,
    len: usize,
}

impl<T: Copy + Default> Lined<T> {
    fn new(v: &[T]) -> Lined<T> {
        let per_line = 64 / std::mem::size_of::<T>();
        let mut buf = vec![T::default(); v.len() + per_line];
        let at = buf.as_ptr().align_offset(64).min(per_line);
        buf[at..at + v.len()].copy_from_slice(v);
        Lined {
            buf,
            at,
            len: v.len(),
        }
    }

    fn get(&self) -> &[T] {
        &self.buf[self.at..self.at + self.len]
    }
}

/// A copy lined up in its own buffer (a plain copy of the `Vec` would move the line).
impl<T: Copy + Default> Clone for Lined<T> {
    fn clone(&self) -> Lined<T> {
        Lined::new(self.get())
    }
}

/// Weights in every encoding benchmarked.
#[derive(Clone)]
enum Enc {
    Panel(Lined<f32>),
    PanelF16(Lined<u16>),
    Q(QBlockLayout, Lined<u8>),
    Sparse(SparseLayout, Lined<u8>),
}

impl Enc {
    fn weights(&self) -> Weights<'_> {
        match self {
            Enc::Panel(p) => Weights::Panel(p.get()),
            Enc::PanelF16(p) => Weights::PanelF16(p.get()),
            Enc::Q(l, b) => Weights::Quantized(QWeights {
                layout: *l,
                bytes: b.get(),
            }),
            Enc::Sparse(l, b) => Weights::Sparse(SparseWeights {
                layout: *l,
                bytes: b.get(),
            }),
        }
    }
}

fn panel(rng: &mut Rng, n: usize, k: usize) -> Vec<f32> {
    let w: Vec<f32> = (0..n * k).map(|_| rng.f32()).collect();
    let mut p = vec![0f32; gemm::packed_len(k, n)];
    // W is n×k row-major; B = Wᵀ is k×n with b[kk, j] = w[j·k + kk].
    gemm::pack_b(k, n, &w, 1, k, &mut p);
    p
}

fn quantized(rng: &mut Rng, n: usize, k: usize, s: QSpec) -> Enc {
    let kp = k.div_ceil(BLOCK) * BLOCK;
    let group = if s.group == 0 { kp } else { s.group };
    let rpt = if s.rpt == 0 { n } else { s.rpt };
    let flags =
        if s.int8 { QFLAG_INT8_ACTIVATIONS } else { 0 } | if s.tiles { QFLAG_ROW_TILES } else { 0 };
    let l = QBlockLayout::new(n, k, [s.bits as u32, group as u32, rpt as u32, flags]).unwrap();
    let e = l.entries();
    let mut bytes = vec![0u8; l.len];
    for r in 0..n {
        for b in 0..kp / BLOCK {
            let codes: Vec<u8> = (0..BLOCK).map(|_| rng.below(s.codes) as u8).collect();
            let mut packed = [0u8; BLOCK];
            pack_block(&codes, s.bits, &mut packed[..l.block_bytes()]);
            l.write_block(&mut bytes, r, b, &packed);
        }
    }
    for t in 0..l.tables {
        let tab: Vec<f32> = (0..e)
            .map(|c| f16::from_f32((s.table)(rng, c)).to_f32())
            .collect();
        let exact = tab.iter().all(|v| v.fract() == 0.0 && v.abs() <= 127.0);
        let amax = tab.iter().fold(0f32, |m, v| m.max(v.abs()));
        let sc = if exact || amax == 0.0 {
            1.0
        } else {
            amax / 127.0
        };
        for (c, v) in tab.iter().enumerate() {
            let o = l.lut_off + (t * e + c) * 2;
            bytes[o..o + 2].copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            if s.int8 {
                bytes[l.lut_i8_off + t * e + c] = (v / sc).round().clamp(-127.0, 127.0) as i8 as u8;
            }
        }
        if s.int8 {
            let o = l.lut_scale_off + t * 4;
            bytes[o..o + 4].copy_from_slice(&sc.to_le_bytes());
        }
    }
    let gpr = l.groups_per_row();
    for i in 0..n * gpr {
        let o = l.scale_offset(i / gpr, i % gpr);
        bytes[o..o + 2].copy_from_slice(
            &f16::from_f32(0.01 + rng.f32().abs() * 0.02)
                .to_bits()
                .to_le_bytes(),
        );
    }
    Enc::Q(l, Lined::new(&bytes))
}

fn sparse(rng: &mut Rng, n: usize, k: usize, keep: usize, m: usize) -> Enc {
    let l = SparseLayout::new(n, k, [keep as u32, m as u32, 0, 0]).unwrap();
    let mut bytes = vec![0u8; l.len];
    for i in 0..n * l.per_row() {
        bytes[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(rng.f32()).to_bits().to_le_bytes());
    }
    for b in &mut bytes[l.pos_off..] {
        *b = rng.next() as u8;
    }
    Enc::Sparse(l, Lined::new(&bytes))
}

fn random(rng: &mut Rng, _: usize) -> f32 {
    rng.f32()
}

/// Builds one encoding of an `n × k` weight.
type Encoder = Box<dyn Fn(&mut Rng, usize, usize) -> Enc>;

/// The kernels benchmarked: a name and an encoder.
fn kinds() -> Vec<(&'static str, Encoder)> {
    let q = |s: QSpec| -> Encoder { Box::new(move |r: &mut Rng, n, k| quantized(r, n, k, s)) };
    let spec = |bits: usize, group, rpt, int8, table| QSpec {
        bits,
        group,
        rpt,
        int8,
        table,
        codes: 1 << bits,
        tiles: false,
    };
    vec![
        (
            "f32 panel",
            Box::new(|r: &mut Rng, n, k| Enc::Panel(Lined::new(&panel(r, n, k)))),
        ),
        (
            "f16 panel",
            Box::new(|r: &mut Rng, n, k| {
                let bits: Vec<u16> = panel(r, n, k)
                    .iter()
                    .map(|&v| f16::from_f32(v).to_bits())
                    .collect();
                Enc::PanelF16(Lined::new(&bits))
            }),
        ),
        (
            "int8/row q8",
            q(spec(8, 0, 0, true, |_, c| (c as f32 - 128.0).max(-127.0))),
        ),
        (
            "int4 g32 q8",
            q(spec(4, 32, 0, true, |_, c| c as f32 - 8.0)),
        ),
        // As `edgetune compress --int4 --int8-activations` writes it: rows tiled by 16.
        (
            "int4 g32 tiled q8",
            q(QSpec {
                tiles: true,
                ..spec(4, 32, 0, true, |_, c| c as f32 - 8.0)
            }),
        ),
        ("cb4/row q8", q(spec(4, 0, 1, true, random))),
        ("cb4/tensor q8", q(spec(4, 0, 0, true, random))),
        // MiniLM's recipe: a table per 16 rows and an f16 scale per 64 inputs (4.29 bits/weight).
        ("cb4/16 rows g64 q8", q(spec(4, 64, 16, true, random))),
        // The same, rows interleaved by tiles of 16 (as `edgetune compress` writes it).
        (
            "cb4/16 rows g64 tiled q8",
            q(QSpec {
                tiles: true,
                ..spec(4, 64, 16, true, random)
            }),
        ),
        ("cb4/row f32", q(spec(4, 0, 1, false, random))),
        ("cb3/row q8", q(spec(3, 0, 1, true, random))),
        ("cb2/row q8", q(spec(2, 0, 1, true, random))),
        // As the ternary encoder writes them: codes 0, 1, 2 for −1, 0, +1 (3, unused, for +2).
        (
            "ternary g128 q8",
            q(QSpec {
                codes: 3,
                ..spec(2, 128, 0, true, |_, c| [-1.0, 0.0, 1.0, 2.0][c])
            }),
        ),
        // The same, rows interleaved by tiles of 16 (as `edgetune compress --ternary` writes).
        (
            "ternary g128 tiled q8",
            q(QSpec {
                codes: 3,
                tiles: true,
                ..spec(2, 128, 0, true, |_, c| [-1.0, 0.0, 1.0, 2.0][c])
            }),
        ),
        (
            "binary g128 q8",
            q(spec(1, 128, 0, true, |_, c| [-1.0, 1.0][c])),
        ),
        (
            "sparse 2:4",
            Box::new(|r: &mut Rng, n, k| sparse(r, n, k, 2, 4)),
        ),
    ]
}

/// One product's operands.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    enc: Enc,
    a: Vec<f32>,
    bias: Vec<f32>,
    c: Vec<f32>,
    scratch: Vec<u8>,
}

impl Case {
    fn new(rng: &mut Rng, m: usize, n: usize, k: usize, enc: Enc) -> Case {
        Case {
            m,
            n,
            k,
            enc,
            a: (0..m * k).map(|_| rng.f32()).collect(),
            bias: (0..n).map(|_| rng.f32()).collect(),
            c: vec![0.0; m * n],
            scratch: vec![0; m.min(64) * q8_row_bytes(k)],
        }
    }

    fn run(&mut self, ker: &Kernels) {
        let w = self.enc.weights();
        linear(
            ker,
            &w,
            (self.m, self.k, self.n),
            (black_box(&self.a), self.k, 1),
            (&mut self.c, self.n, 1),
            Some(&self.bias),
            Activation::NONE,
            &mut self.scratch,
        );
        black_box(&mut self.c);
    }
}

/// Time of one product in seconds: the fastest of 9 runs of ~20 ms (on a shared machine the
/// slower runs measure the neighbours).
fn time(case: &mut Case, ker: &Kernels) -> f64 {
    let t = Instant::now();
    case.run(ker);
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.02 / once) as usize).max(1);
    let mut ts: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                case.run(ker);
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[0]
}

/// The batch sizes to run (`QGEMM_BENCH_M=1` keeps GEMV only).
fn ms() -> Vec<usize> {
    match std::env::var("QGEMM_BENCH_M")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(m) => vec![m],
        None => MS.to_vec(),
    }
}

fn quick() -> bool {
    std::env::var_os("QGEMM_BENCH_QUICK").is_some()
}

fn bench(c: &mut Criterion) {
    if quick() {
        return;
    }
    let ker = Kernels::best();
    let mut group = c.benchmark_group("qgemm");
    group.warm_up_time(std::time::Duration::from_millis(300));
    group.measurement_time(std::time::Duration::from_secs(1));
    for (n, k) in SHAPES {
        for m in MS {
            group.throughput(Throughput::Elements((m * n * k) as u64));
            for (name, make) in kinds() {
                let mut rng = Rng(1);
                let enc = make(&mut rng, n, k);
                let mut case = Case::new(&mut rng, m, n, k, enc);
                group.bench_function(BenchmarkId::new(name, format!("m{m} {n}x{k}")), |b| {
                    b.iter(|| case.run(&ker))
                });
            }
        }
    }
    group.finish();
}

fn summary(_: &mut Criterion) {
    let ker = Kernels::best();
    println!("\nKernels: {ker:?}, one thread. Time per product (µs) and speed-up over the f32 panel GEMM.");
    let mut head = format!("{:<22}", "kernel");
    for (n, k) in SHAPES {
        for m in ms() {
            head += &format!("{:>22}", format!("m={m} W={n}x{k}"));
        }
    }
    println!("{head}");
    let mut f32_time = Vec::new();
    let only = std::env::var("QGEMM_BENCH_ONLY").ok();
    for (name, make) in kinds() {
        if only
            .as_deref()
            .is_some_and(|o| !name.contains(o) && name != "f32 panel")
        {
            continue;
        }
        let mut line = format!("{name:<22}");
        let mut col = 0;
        for (n, k) in SHAPES {
            for m in ms() {
                let mut rng = Rng(1);
                let enc = make(&mut rng, n, k);
                let mut case = Case::new(&mut rng, m, n, k, enc);
                let t = time(&mut case, &ker);
                if f32_time.len() <= col {
                    f32_time.push(t);
                }
                line += &format!(
                    "{:>22}",
                    format!("{:.1} ({:.2}x)", t * 1e6, f32_time[col] / t)
                );
                col += 1;
            }
        }
        println!("{line}");
    }
}

/// Bytes of a weight encoding.
fn enc_bytes(e: &Enc) -> usize {
    match e {
        Enc::Panel(p) => p.len * 4,
        Enc::PanelF16(p) => p.len * 2,
        Enc::Q(_, b) | Enc::Sparse(_, b) => b.len,
    }
}

/// GEMV with cold weights: copies of the weight filling `COLD_BYTES`, one per product in turn.
fn cold(_: &mut Criterion) {
    const COLD_BYTES: usize = 96 << 20;
    let ker = Kernels::best();
    println!(
        "\nGEMV (m = 1) with cold weights (a {} MiB working set): µs and speed-up over f32.",
        COLD_BYTES >> 20
    );
    let mut head = format!("{:<22}", "kernel");
    for (n, k) in SHAPES {
        head += &format!("{:>22}", format!("W={n}x{k}"));
    }
    println!("{head}");
    let only = std::env::var("QGEMM_BENCH_ONLY").ok();
    let mut f32_time = Vec::new();
    for (name, make) in kinds() {
        if only
            .as_deref()
            .is_some_and(|o| !name.contains(o) && name != "f32 panel")
        {
            continue;
        }
        let mut line = format!("{name:<22}");
        for (col, (n, k)) in SHAPES.into_iter().enumerate() {
            let mut rng = Rng(1);
            let enc = make(&mut rng, n, k);
            let copies = (COLD_BYTES / enc_bytes(&enc)).max(2);
            let mut cases: Vec<Case> = (0..copies)
                .map(|_| Case::new(&mut rng, 1, n, k, enc.clone()))
                .collect();
            let mut t = f64::MAX;
            for _ in 0..5 {
                let start = Instant::now();
                for c in cases.iter_mut() {
                    c.run(&ker);
                }
                t = t.min(start.elapsed().as_secs_f64() / copies as f64);
            }
            if f32_time.len() <= col {
                f32_time.push(t);
            }
            line += &format!(
                "{:>22}",
                format!("{:.1} ({:.2}x)", t * 1e6, f32_time[col] / t)
            );
        }
        println!("{line}");
    }
}

/// GEMV with each int8-activation kernel set this CPU runs, beside the one `Kernels::best`
/// picks, so the dispatch order can be checked on a new CPU.
fn kernel_sets(_: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    let sets = edgetune_runtime::kernels::qgemm::x86_64::variants();
    #[cfg(target_arch = "aarch64")]
    let sets = edgetune_runtime::kernels::qgemm::aarch64::variants();
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let sets: [Option<Kernels>; 0] = [];
    let sets: Vec<Kernels> = sets.into_iter().flatten().collect();
    let best = Kernels::best();
    println!(
        "\nGEMV (m = 1), weights hot, per int8-activation kernel set: µs (best: {}).",
        best.qgemm_name
    );
    let mut head = format!("{:<22}", "kernel");
    for (n, k) in SHAPES {
        for s in &sets {
            head += &format!(
                "{:>22}",
                format!("{} {n}x{k}", s.qgemm_name.trim_start_matches("x86_64-"))
            );
        }
    }
    println!("{head}");
    let only = std::env::var("QGEMM_BENCH_ONLY").ok();
    for (name, make) in kinds() {
        if !name.ends_with(" q8") || only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let mut line = format!("{name:<22}");
        for (n, k) in SHAPES {
            for s in &sets {
                let mut rng = Rng(1);
                let enc = make(&mut rng, n, k);
                let mut case = Case::new(&mut rng, 1, n, k, enc);
                line += &format!("{:>22.1}", time(&mut case, s) * 1e6);
            }
        }
        println!("{line}");
    }
}

criterion_group!(benches, bench, summary, kernel_sets, cold);
criterion_main!(benches);
