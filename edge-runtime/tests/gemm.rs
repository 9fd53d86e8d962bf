//! The fast GEMM kernels against the scalar reference (itself checked against the definition),
//! on many shapes, strides, biases and activations; `pack_b` against its definition; threaded
//! against single-threaded.

use edgetune_core::{ActKind, Activation};
use edgetune_runtime::kernels::gemm::{self, Gemm, GemmKernel, NR};
use edgetune_runtime::kernels::Kernels;
use edgetune_runtime::math::apply;

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.f32()).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// How `A` and `C` are laid out.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// A row-major `m × k`, C row-major `m × n`.
    RowMajor,
    /// A stored `k × m` (a_rs = 1, a_cs = m), C row-major.
    TransposedA,
    /// The NCHW convolution case: A is `k × m` (a_rs = 1, a_cs = m), C is `n × m`
    /// (c_rs = 1, c_cs = m).
    Nchw,
    /// Row-major A and C, with rows padded (strides larger than the widths).
    Padded,
}

const LAYOUTS: [Layout; 4] = [
    Layout::RowMajor,
    Layout::TransposedA,
    Layout::Nchw,
    Layout::Padded,
];

/// One product's inputs, in the layout under test.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    a: Vec<f32>,
    a_rs: usize,
    a_cs: usize,
    /// Logical B, row-major `k × n` (for the error bound and `pack_b`).
    b: Vec<f32>,
    packed: Vec<f32>,
    c_len: usize,
    c_rs: usize,
    c_cs: usize,
    bias: Option<Vec<f32>>,
    act: Activation,
}

impl Case {
    fn new(
        rng: &mut Rng,
        m: usize,
        n: usize,
        k: usize,
        layout: Layout,
        bias: bool,
        act: Activation,
    ) -> Case {
        let (a_rs, a_cs, a_len) = match layout {
            Layout::RowMajor => (k, 1, m * k),
            Layout::TransposedA | Layout::Nchw => (1, m, m * k),
            Layout::Padded => (k + 3, 1, m * (k + 3)),
        };
        let (c_rs, c_cs, c_len) = match layout {
            Layout::RowMajor | Layout::TransposedA => (n, 1, m * n),
            Layout::Nchw => (1, m, m * n),
            Layout::Padded => (n + 5, 1, m * (n + 5)),
        };
        let a = rng.vec(a_len.max(1));
        let b = rng.vec(k * n);
        let mut packed = vec![f32::NAN; gemm::packed_len(k, n)];
        gemm::pack_b(k, n, &b, n, 1, &mut packed);
        let bias = bias.then(|| rng.vec(n));
        Case {
            m,
            n,
            k,
            a,
            a_rs,
            a_cs,
            b,
            packed,
            c_len,
            c_rs,
            c_cs,
            bias,
            act,
        }
    }

    /// Runs the product with `ker`; C starts as NaN so unwritten elements show.
    fn run(&self, ker: &GemmKernel) -> Vec<f32> {
        let mut c = vec![f32::NAN; self.c_len];
        gemm::gemm(
            ker,
            Gemm {
                m: self.m,
                n: self.n,
                k: self.k,
                a: &self.a,
                a_rs: self.a_rs,
                a_cs: self.a_cs,
                b: &self.packed,
                c: &mut c,
                c_rs: self.c_rs,
                c_cs: self.c_cs,
                bias: self.bias.as_deref(),
                act: self.act,
            },
        );
        c
    }

    /// The product straight from its definition (sums in f64), laid out like C, padding NaN.
    /// Checks the frame (tiling, bias, activation) independently of every kernel.
    fn naive(&self) -> Vec<f32> {
        let mut c = vec![f32::NAN; self.c_len];
        for i in 0..self.m {
            for j in 0..self.n {
                let dot: f64 = (0..self.k)
                    .map(|kk| self.a_at(i, kk) as f64 * self.b[kk * self.n + j] as f64)
                    .sum();
                let bias = self.bias.as_ref().map_or(0.0, |b| b[j]);
                c[i * self.c_rs + j * self.c_cs] = apply(&self.act, dot as f32 + bias);
            }
        }
        c
    }

    fn a_at(&self, i: usize, kk: usize) -> f32 {
        self.a[i * self.a_rs + kk * self.a_cs]
    }

    /// Compares `fast` with `reference` on every element of C; padding must stay untouched.
    fn check(&self, fast: &[f32], reference: &[f32], what: &str) {
        let mut in_c = vec![false; self.c_len];
        for i in 0..self.m {
            for j in 0..self.n {
                let at = i * self.c_rs + j * self.c_cs;
                in_c[at] = true;
                let (f, r) = (fast[at], reference[at]);
                let scale: f32 = (0..self.k)
                    .map(|kk| (self.a_at(i, kk) * self.b[kk * self.n + j]).abs())
                    .sum();
                let tol = 1e-5 * (1.0 + scale);
                assert!(
                    (f - r).abs() <= tol,
                    "{what}: m={} n={} k={} C[{i},{j}] = {f}, reference {r} (tol {tol})",
                    self.m,
                    self.n,
                    self.k
                );
            }
        }
        for (at, _) in in_c.iter().enumerate().filter(|(_, &inside)| !inside) {
            assert!(fast[at].is_nan(), "{what}: wrote C padding at {at}");
        }
    }
}

/// The activations tested: identity and the two the fused epilogue special-cases, plus one that
/// goes through the scalar path.
fn activations() -> [Activation; 4] {
    [
        Activation::NONE,
        Activation::plain(ActKind::Relu),
        Activation {
            kind: ActKind::Clip,
            a: -0.25,
            b: 0.5,
        },
        Activation::plain(ActKind::Tanh),
    ]
}

/// The kernels to test against the reference: the chosen one and, when this CPU has it, the
/// architecture's own (named explicitly, so a wrong `best()` cannot hide it).
fn fast_kernels() -> Vec<GemmKernel> {
    let mut kernels = vec![Kernels::best().gemm];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        kernels.push(gemm::x86_64::KERNEL);
    }
    #[cfg(target_arch = "aarch64")]
    kernels.push(gemm::aarch64::KERNEL);
    kernels
}

const KS: [usize; 8] = [1, 2, 3, 7, 16, 33, 100, 384];

/// Every m in 1..=40 and a spread of n in 1..=70 (all small ones, each side of every multiple of
/// 16), each k, layout, bias and activation, on a random sample so the test stays quick.
#[test]
fn fast_kernels_match_reference() {
    let reference = gemm::generic::KERNEL;
    let kernels = fast_kernels();
    let ns: Vec<usize> = (1..=70)
        .filter(|n| *n <= 18 || n % 16 <= 1 || n % 16 == 15 || n % 7 == 0)
        .collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut cases = 0;
    for m in 1..=40 {
        for &k in &KS {
            // A few n per (m, k), cycling layouts, bias and activations so all combinations
            // meet across the sweep.
            for _ in 0..3 {
                let n = ns[rng.below(ns.len())];
                let layout = LAYOUTS[rng.below(LAYOUTS.len())];
                let bias = rng.below(2) == 0;
                let act = activations()[rng.below(4)];
                let case = Case::new(&mut rng, m, n, k, layout, bias, act);
                let want = case.run(&reference);
                case.check(&want, &case.naive(), "reference vs definition");
                for ker in &kernels {
                    let what = format!("{} {layout:?} bias={bias} act={:?}", ker.name, act.kind);
                    case.check(&case.run(ker), &want, &what);
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 40 * KS.len() * 3);
}

/// Every combination of layout, bias and activation on shapes that exercise full tiles, short
/// tiles and ragged panels at once.
#[test]
fn all_layouts_biases_and_activations() {
    let reference = gemm::generic::KERNEL;
    let kernels = fast_kernels();
    let mut rng = Rng(42);
    for (m, n, k) in [
        (1, 1, 1),
        (1, 70, 384),
        (5, 17, 7),
        (6, 16, 16),
        (13, 33, 33),
        (40, 47, 100),
        (7, 64, 3),
    ] {
        for layout in LAYOUTS {
            for bias in [false, true] {
                for act in activations() {
                    let case = Case::new(&mut rng, m, n, k, layout, bias, act);
                    let want = case.run(&reference);
                    case.check(&want, &case.naive(), "reference vs definition");
                    for ker in &kernels {
                        let what =
                            format!("{} {layout:?} bias={bias} act={:?}", ker.name, act.kind);
                        case.check(&case.run(ker), &want, &what);
                    }
                }
            }
        }
    }
}

/// k = 0: C is the bias (or zero), then the activation.
#[test]
fn empty_inner_dimension_gives_bias() {
    for ker in fast_kernels() {
        let (m, n) = (7, 19);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 - 9.0).collect();
        let mut c = vec![f32::NAN; m * n];
        gemm::gemm(
            &ker,
            Gemm {
                m,
                n,
                k: 0,
                a: &[],
                a_rs: 0,
                a_cs: 0,
                b: &[],
                c: &mut c,
                c_rs: n,
                c_cs: 1,
                bias: Some(&bias),
                act: Activation::plain(ActKind::Relu),
            },
        );
        for i in 0..m {
            for j in 0..n {
                assert_eq!(c[i * n + j], bias[j].max(0.0), "{}", ker.name);
            }
        }
    }
}

/// The tolerance is tight enough to catch a single wrong term: a reference perturbed by one
/// product `a·b` in one element fails `check`.
#[test]
#[should_panic(expected = "reference")]
fn check_catches_one_wrong_term() {
    let mut rng = Rng(7);
    let case = Case::new(
        &mut rng,
        9,
        20,
        100,
        Layout::RowMajor,
        true,
        Activation::NONE,
    );
    let want = case.run(&gemm::generic::KERNEL);
    let mut wrong = want.clone();
    wrong[3 * 20 + 17] += case.a_at(3, 50) * case.b[50 * 20 + 17];
    case.check(&wrong, &want, "perturbed");
}

/// `pack_b` against its definition, for row-major and transposed sources.
#[test]
fn pack_b_matches_definition() {
    let mut rng = Rng(3);
    for (k, n) in [(1, 1), (3, 16), (7, 17), (33, 70), (16, 32), (5, 15)] {
        let src = rng.vec(k * n);
        for (b_rs, b_cs) in [(n, 1), (1, k)] {
            let mut out = vec![f32::NAN; gemm::packed_len(k, n) + 3];
            gemm::pack_b(k, n, &src, b_rs, b_cs, &mut out);
            assert_eq!(gemm::packed_len(k, n), n.div_ceil(NR) * k * NR);
            for p in 0..n.div_ceil(NR) {
                for kk in 0..k {
                    for jj in 0..NR {
                        let j = p * NR + jj;
                        let want = if j < n {
                            src[kk * b_rs + j * b_cs]
                        } else {
                            0.0
                        };
                        let got = out[p * k * NR + kk * NR + jj];
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "k={k} n={n} p={p} kk={kk} jj={jj}"
                        );
                    }
                }
            }
            assert!(
                out[gemm::packed_len(k, n)..].iter().all(|v| v.is_nan()),
                "wrote past packed_len"
            );
        }
    }
}

/// The architecture's kernel is the one chosen where it exists (with `std`, detection is at run
/// time; on aarch64 NEON is baseline).
#[test]
fn best_picks_the_architecture_kernel() {
    let name = Kernels::best().gemm.name;
    println!("best gemm kernel: {name}");
    #[cfg(target_arch = "aarch64")]
    assert_eq!(name, "aarch64-neon");
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        assert_eq!(name, "x86_64-avx2-fma");
    }
}

/// Two rayon threads give exactly the single-threaded result (same tiling, disjoint writes), on
/// shapes that split by rows and by panels, with a strided C.
#[cfg(feature = "std")]
#[test]
fn threaded_matches_single_threaded() {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = Rng(11);
    for ker in [Kernels::best().gemm, gemm::generic::KERNEL] {
        for (m, n, k, layout) in [
            (300, 200, 150, Layout::RowMajor),
            (301, 203, 151, Layout::Nchw),
            (8, 1000, 300, Layout::RowMajor),
            (8, 999, 301, Layout::TransposedA),
        ] {
            let case = Case::new(
                &mut rng,
                m,
                n,
                k,
                layout,
                true,
                Activation::plain(ActKind::Relu),
            );
            let single = one.install(|| case.run(&ker));
            let threaded = two.install(|| case.run(&ker));
            assert!(
                single
                    .iter()
                    .zip(&threaded)
                    .all(|(s, t)| s.to_bits() == t.to_bits()),
                "{} {m}x{n}x{k} {layout:?}: threaded differs",
                ker.name
            );
            case.check(
                &threaded,
                &one.install(|| case.run(&gemm::generic::KERNEL)),
                ker.name,
            );
        }
    }
}
