//! f32 GEMM throughput on MiniLM's feed-forward weights (384→1536 and 1536→384), at m = 1
//! (GEMV, one token), 32 and 128, for the reference kernel and `Kernels::best()`, on one thread.
//!
//! `cargo bench -p edgetune-runtime --features std --bench gemm` (without `std` on x86_64 the
//! best kernel is the reference unless AVX2+FMA are enabled at compile time). Criterion prints
//! the throughput in elements/s where one element is one multiply-add: GFLOP/s = 2 × Gelem/s.
//! A GFLOP/s summary is printed at the end.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgetune_core::Activation;
use edgetune_runtime::kernels::gemm::{self, Gemm, GemmKernel};
use edgetune_runtime::kernels::Kernels;

/// (k, n): 384→1536 and 1536→384.
const LAYERS: [(usize, usize); 2] = [(384, 1536), (1536, 384)];
const MS: [usize; 3] = [1, 32, 128];

/// Operands of one shape, filled with a cheap deterministic pattern.
struct Operands {
    m: usize,
    n: usize,
    k: usize,
    a: Vec<f32>,
    packed: Vec<f32>,
    bias: Vec<f32>,
    c: Vec<f32>,
}

impl Operands {
    fn new(m: usize, k: usize, n: usize) -> Operands {
        let val = |i: usize| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5;
        let a = (0..m * k).map(val).collect();
        let b: Vec<f32> = (0..k * n).map(|i| val(i + 13)).collect();
        let mut packed = vec![0.0; gemm::packed_len(k, n)];
        gemm::pack_b(k, n, &b, n, 1, &mut packed);
        let bias = (0..n).map(val).collect();
        Operands {
            m,
            n,
            k,
            a,
            packed,
            bias,
            c: vec![0.0; m * n],
        }
    }

    /// One row-major product with bias.
    fn run(&mut self, ker: &GemmKernel) {
        gemm::gemm(
            ker,
            Gemm {
                m: self.m,
                n: self.n,
                k: self.k,
                a: black_box(&self.a),
                a_rs: self.k,
                a_cs: 1,
                b: black_box(&self.packed),
                c: &mut self.c,
                c_rs: self.n,
                c_cs: 1,
                bias: Some(&self.bias),
                act: Activation::NONE,
            },
        );
        black_box(&mut self.c);
    }
}

/// Makes every product below run on one thread: the global rayon pool gets one thread when
/// threads are compiled in (criterion's state cannot move into a pool's `install`).
fn single_threaded(f: impl FnOnce()) {
    #[cfg(feature = "std")]
    {
        // Fails only if the pool already exists, i.e. a previous call built it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build_global();
        assert_eq!(
            rayon::current_num_threads(),
            1,
            "global rayon pool has several threads"
        );
    }
    f();
}

fn kernels() -> Vec<GemmKernel> {
    let best = Kernels::best().gemm;
    let generic = gemm::generic::KERNEL;
    if best.name == generic.name {
        vec![generic]
    } else {
        vec![generic, best]
    }
}

fn bench_gemm(c: &mut Criterion) {
    single_threaded(|| {
        let mut group = c.benchmark_group("gemm");
        for (k, n) in LAYERS {
            for m in MS {
                let mut ops = Operands::new(m, k, n);
                group.throughput(Throughput::Elements((m * n * k) as u64));
                for ker in kernels() {
                    let id = BenchmarkId::new(ker.name, format!("{m}x{k}->{n}"));
                    group.bench_function(id, |bench| bench.iter(|| ops.run(&ker)));
                }
            }
        }
        group.finish();
    });
}

/// A short GFLOP/s table (median of a few timed batches), easier to read than criterion's
/// element rates.
fn summary(_: &mut Criterion) {
    single_threaded(|| {
        println!("\nGFLOP/s, one thread:");
        println!(
            "{:<16}{}",
            "shape",
            kernels()
                .iter()
                .map(|k| format!("{:>18}", k.name))
                .collect::<String>()
        );
        for (k, n) in LAYERS {
            for m in MS {
                let mut ops = Operands::new(m, k, n);
                let flops = 2.0 * (m * n * k) as f64;
                let mut line = format!("{:<16}", format!("{m}x{k}->{n}"));
                for ker in kernels() {
                    let reps = ((2e8 / flops) as usize).max(1);
                    let mut rates: Vec<f64> = (0..7)
                        .map(|_| {
                            let t = Instant::now();
                            for _ in 0..reps {
                                ops.run(&ker);
                            }
                            flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9
                        })
                        .collect();
                    rates.sort_by(f64::total_cmp);
                    line += &format!("{:>18.1}", rates[3]);
                }
                println!("{line}");
            }
        }
    });
}

criterion_group!(benches, bench_gemm, summary);
criterion_main!(benches);
