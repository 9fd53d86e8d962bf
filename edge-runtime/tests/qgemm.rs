//! Compressed-weight products: `Kernels::best()` against `Kernels::reference()`, the reference
//! against dense arithmetic on the decoded weights, and the f16 panel GEMM against the f32 GEMM.
//!
//! Weights are built here with a tiny encoder of our own (random codes, tables and scales laid
//! out with `edgetune_core::layout`), so these tests do not depend on the host-side quantizers.

use edgetune_core::layout::{
    pack_block, QBlockLayout, SparseLayout, BLOCK, QFLAG_INT8_ACTIVATIONS, QFLAG_ROW_TILES,
};
use edgetune_core::{ActKind, Activation};
use edgetune_runtime::kernels::gemm::{self, NR};
use edgetune_runtime::kernels::linear::{linear, Weights};
use edgetune_runtime::kernels::qgemm::{self, q8_row_bytes, QGemm, QWeights, SparseWeights};
use edgetune_runtime::kernels::Kernels;
use edgetune_runtime::math::apply;
use half::f16;

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

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// What the tables hold.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Table {
    /// Random f16 centroids (a codebook): the i8 table is scaled.
    Random,
    /// Integer levels `c − 2^(b−1)` (group quantization): the i8 table is exact.
    Linear,
    /// {−1, 0, 1, 2}, 2 bits (as the ternary encoder writes it).
    Ternary,
    /// {−1, 1}, 1 bit.
    Binary,
    /// `max(c − 128, −127)`, 8 bits (int8 per row).
    Int8Rows,
    /// Random integers in −128..=127 written straight into the i8 table (with −128 present):
    /// bytes no encoder writes, which the fast kernels must still multiply exactly.
    RawI8,
    /// `3c − 20`: integer levels with a slope (affine with α ≠ 1).
    Affine3,
}

/// A block-quantized weight and its decoded values.
struct QCase {
    layout: QBlockLayout,
    bytes: Vec<u8>,
    /// `scale · lut[code]` (what the f32 path multiplies), row-major `n × k`.
    w: Vec<f32>,
    /// `scale · lut_i8[code] · lut_scale` (what the int8 path multiplies).
    w8: Vec<f32>,
}

impl QCase {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        n: usize,
        k: usize,
        bits: usize,
        group: usize,
        rpt: usize,
        int8: bool,
        table: Table,
    ) -> QCase {
        let flags = if int8 { QFLAG_INT8_ACTIVATIONS } else { 0 };
        QCase::with_flags(rng, n, k, bits, group, rpt, flags, table)
    }

    /// As [`QCase::new`], with any layout flags (row tiles included).
    #[allow(clippy::too_many_arguments)]
    fn with_flags(
        rng: &mut Rng,
        n: usize,
        k: usize,
        bits: usize,
        group: usize,
        rpt: usize,
        flags: u32,
        table: Table,
    ) -> QCase {
        let int8 = flags & QFLAG_INT8_ACTIVATIONS != 0;
        let l = QBlockLayout::new(n, k, [bits as u32, group as u32, rpt as u32, flags])
            .expect("valid layout");
        let e = l.entries();
        let mut bytes = vec![0u8; l.len];
        let mut codes = vec![0u8; n * k];
        for c in codes.iter_mut() {
            *c = rng.below(e) as u8;
        }
        if table == Table::Int8Rows && rng.below(2) == 0 {
            // The int8-row encoder never writes code 0; sometimes follow it.
            codes.iter_mut().for_each(|c| *c = (*c).max(1));
        }
        if table == Table::Ternary && rng.below(2) == 0 {
            // Nor does the ternary encoder write code 3.
            codes.iter_mut().for_each(|c| *c %= 3);
        }
        for r in 0..n {
            for b in 0..l.kp / BLOCK {
                let block: Vec<u8> = (0..BLOCK)
                    .map(|e| {
                        let kk = b * BLOCK + e;
                        if kk < k {
                            codes[r * k + kk]
                        } else {
                            0
                        }
                    })
                    .collect();
                let mut packed = [0u8; BLOCK];
                pack_block(&block, bits, &mut packed[..l.block_bytes()]);
                l.write_block(&mut bytes, r, b, &packed);
            }
        }
        let mut luts = vec![0f32; l.tables * e];
        let mut luts8 = vec![0i8; l.tables * e];
        let mut lut_scales = vec![0f32; l.tables];
        for t in 0..l.tables {
            let tab = &mut luts[t * e..(t + 1) * e];
            let tab8 = &mut luts8[t * e..(t + 1) * e];
            let half = (e / 2) as f32;
            for (c, v) in tab.iter_mut().enumerate() {
                *v = match table {
                    Table::Random => f16_round(rng.f32()),
                    Table::Linear => c as f32 - half,
                    Table::Ternary => [-1.0, 0.0, 1.0, 2.0][c],
                    Table::Binary => [-1.0, 1.0][c],
                    Table::Int8Rows => (c as f32 - 128.0).max(-127.0),
                    Table::RawI8 => rng.below(256) as f32 - 128.0,
                    Table::Affine3 => 3.0 * c as f32 - 20.0,
                };
            }
            if table == Table::RawI8 {
                tab[rng.below(e)] = -128.0;
            }
            // The encoder's rule: integer levels within ±127 are exact; otherwise scale by
            // max|v| / 127. Raw tables go in as they are, −128 included.
            let exact = tab.iter().all(|v| v.fract() == 0.0 && v.abs() <= 127.0);
            let amax = tab.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if exact || table == Table::RawI8 || amax == 0.0 {
                1.0
            } else {
                amax / 127.0
            };
            for (c, v) in tab.iter().enumerate() {
                tab8[c] = if table == Table::RawI8 {
                    *v as i8
                } else {
                    (v / s).round().clamp(-127.0, 127.0) as i8
                };
                let o = l.lut_off + (t * e + c) * 2;
                bytes[o..o + 2].copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
                if int8 {
                    bytes[l.lut_i8_off + t * e + c] = tab8[c] as u8;
                }
            }
            lut_scales[t] = s;
            if int8 {
                // The int8 tables exist only with the flag.
                let o = l.lut_scale_off + t * 4;
                bytes[o..o + 4].copy_from_slice(&s.to_le_bytes());
            }
        }
        let gpr = l.groups_per_row();
        let mut scales = vec![0f32; n * gpr];
        for (i, s) in scales.iter_mut().enumerate() {
            *s = f16_round(0.25 + rng.f32().abs() * if rng.below(4) == 0 { -1.0 } else { 1.0 });
            let o = l.scale_offset(i / gpr, i % gpr);
            bytes[o..o + 2].copy_from_slice(&f16::from_f32(*s).to_bits().to_le_bytes());
        }
        let mut w = vec![0f32; n * k];
        let mut w8 = vec![0f32; n * k];
        for r in 0..n {
            let t = r / rpt;
            for kk in 0..k {
                let c = codes[r * k + kk] as usize;
                let s = scales[r * gpr + kk / group];
                w[r * k + kk] = s * luts[t * e + c];
                w8[r * k + kk] = s * luts8[t * e + c] as f32 * lut_scales[t];
            }
        }
        QCase {
            layout: l,
            bytes,
            w,
            w8,
        }
    }

    fn weights(&self) -> QWeights<'_> {
        QWeights {
            layout: self.layout,
            bytes: &self.bytes,
        }
    }
}

/// Activations and output layout of one product.
struct Io {
    m: usize,
    n: usize,
    k: usize,
    a: Vec<f32>,
    a_rs: usize,
    c_len: usize,
    c_rs: usize,
    c_cs: usize,
    bias: Option<Vec<f32>>,
    act: Activation,
}

impl Io {
    fn new(rng: &mut Rng, m: usize, n: usize, k: usize) -> Io {
        let a_rs = k + rng.below(2) * 3;
        let a = rng.vec((m - 1) * a_rs + k);
        let (c_rs, c_cs, c_len) = if rng.below(2) == 0 {
            (n, 1, m * n)
        } else {
            // "NCHW": column-major C.
            (1, m, m * n)
        };
        let bias = (rng.below(2) == 0).then(|| rng.vec(n));
        let act = activations()[rng.below(4)];
        Io {
            m,
            n,
            k,
            a,
            a_rs,
            c_len,
            c_rs,
            c_cs,
            bias,
            act,
        }
    }

    /// The same operands with C row-major or column-major ("NCHW").
    fn with_c(mut self, col_major: bool) -> Io {
        (self.c_rs, self.c_cs) = if col_major { (1, self.m) } else { (self.n, 1) };
        self
    }

    fn x(&self, i: usize) -> &[f32] {
        &self.a[i * self.a_rs..i * self.a_rs + self.k]
    }

    fn g<'a>(&'a self, c: &'a mut [f32]) -> QGemm<'a> {
        QGemm {
            m: self.m,
            a: &self.a,
            a_rs: self.a_rs,
            c,
            c_rs: self.c_rs,
            c_cs: self.c_cs,
            bias: self.bias.as_deref(),
            act: self.act,
        }
    }

    fn at(&self, i: usize, j: usize) -> usize {
        i * self.c_rs + j * self.c_cs
    }

    /// Applies bias and activation to pre-activation values `v[i][j]`, laid out like C.
    fn finish(&self, v: impl Fn(usize, usize) -> f64) -> Vec<f32> {
        let mut c = vec![f32::NAN; self.c_len];
        for i in 0..self.m {
            for j in 0..self.n {
                let b = self.bias.as_ref().map_or(0.0, |b| b[j]);
                c[self.at(i, j)] = apply(&self.act, v(i, j) as f32 + b);
            }
        }
        c
    }

    /// Compares every element of C within `tol(i, j)`; C has no padding in these layouts.
    fn check(&self, got: &[f32], want: &[f32], tol: impl Fn(usize, usize) -> f64, what: &str) {
        for i in 0..self.m {
            for j in 0..self.n {
                let (g, w) = (got[self.at(i, j)], want[self.at(i, j)]);
                let t = tol(i, j);
                assert!(
                    (g as f64 - w as f64).abs() <= t || (g.is_nan() && w.is_nan()),
                    "{what}: m={} n={} k={} C[{i},{j}] = {g}, want {w} (tol {t})",
                    self.m,
                    self.n,
                    self.k
                );
            }
        }
    }
}

/// Identity, the two piecewise-linear ones and tanh: all 1-Lipschitz, so error bounds on the
/// sums hold for the outputs.
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

/// The int8 quantization of one activation row, computed here independently: `(x̂, |x − x̂|)`.
fn quantized(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut xq = vec![0f32; x.len()];
    for (b, block) in x.chunks(BLOCK).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        for (e, &v) in block.iter().enumerate() {
            let q = if d > 0.0 {
                (v * (1.0 / d)).round().clamp(-127.0, 127.0)
            } else {
                0.0
            };
            xq[b * BLOCK + e] = q * d;
        }
    }
    let err = x.iter().zip(&xq).map(|(a, b)| (a - b).abs()).collect();
    (xq, err)
}

fn dot(x: &[f32], w: &[f32]) -> f64 {
    x.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn absdot(x: &[f32], w: &[f32]) -> f64 {
    x.iter()
        .zip(w)
        .map(|(&a, &b)| (a as f64 * b as f64).abs())
        .sum()
}

/// Tolerance between two float evaluations of the same sums: `1e-4 · (1 + Σ|terms|)`.
const REL: f64 = 1e-4;

/// The fast kernels (best() and, where the CPU has them, each architecture variant).
fn fast_kernels() -> Vec<Kernels> {
    let best = Kernels::best();
    #[allow(unused_mut)]
    let mut ks = vec![best];
    #[cfg(target_arch = "aarch64")]
    let variants = edgetune_runtime::kernels::qgemm::aarch64::variants();
    #[cfg(target_arch = "x86_64")]
    let variants = edgetune_runtime::kernels::qgemm::x86_64::variants();
    #[cfg(any(target_arch = "aarch64", target_arch = "x86_64"))]
    for v in variants.into_iter().flatten() {
        if v.qgemm_name != best.qgemm_name {
            ks.push(v);
        }
    }
    ks
}

/// Runs one block-quantized product with `ker` (f32 or int8 path, per the weight's flag) into a
/// NaN-filled C; `chunk` caps the quantized rows per kernel call.
fn run_q(ker: &Kernels, q: &QCase, io: &Io, chunk: usize) -> Vec<f32> {
    let mut c = vec![f32::NAN; io.c_len];
    let w = q.weights();
    if q.layout.int8_activations() {
        let mut scratch = vec![0u8; chunk.min(io.m) * q8_row_bytes(io.k)];
        qgemm::qgemm_q8(ker, &w, io.g(&mut c), &mut scratch);
    } else {
        qgemm::qgemm_f32(ker, &w, io.g(&mut c));
    }
    c
}

/// One block-quantized case: the reference against dense arithmetic, every fast kernel against
/// the reference.
fn check_q(q: &QCase, io: &Io, what: &str) {
    let reference = Kernels::reference();
    let want = run_q(&reference, q, io, 64);
    let k = io.k;
    let w = |j: usize| &q.w[j * k..(j + 1) * k];
    let w8 = |j: usize| &q.w8[j * k..(j + 1) * k];
    if q.layout.int8_activations() {
        let xs: Vec<(Vec<f32>, Vec<f32>)> = (0..io.m).map(|i| quantized(io.x(i))).collect();
        // Exactly Σ x̂·ŵ, up to float rounding.
        let exact = io.finish(|i, j| dot(&xs[i].0, w8(j)));
        io.check(
            &want,
            &exact,
            |i, j| REL * (1.0 + absdot(&xs[i].0, w8(j))),
            &format!("{what}: reference vs Σ x̂ŵ"),
        );
        // And Σ x·w within the quantization error of both operands.
        let dense = io.finish(|i, j| dot(io.x(i), w(j)));
        let bound = |i: usize, j: usize| {
            let (xq, xe) = &xs[i];
            let werr: f64 = (0..k)
                .map(|kk| (io.x(i)[kk] as f64 * (w(j)[kk] - w8(j)[kk]) as f64).abs())
                .sum();
            werr + absdot(xe, w8(j)) + REL * (1.0 + absdot(xq, w8(j)) + absdot(io.x(i), w(j)))
        };
        io.check(&want, &dense, bound, &format!("{what}: reference vs Σ xw"));
    } else {
        let dense = io.finish(|i, j| dot(io.x(i), w(j)));
        io.check(
            &want,
            &dense,
            |i, j| REL * (1.0 + absdot(io.x(i), w(j))),
            &format!("{what}: reference vs Σ xw"),
        );
    }
    let tol = |i: usize, j: usize| {
        if q.layout.int8_activations() {
            let (xq, _) = quantized(io.x(i));
            REL * (1.0 + absdot(&xq, w8(j)))
        } else {
            REL * (1.0 + absdot(io.x(i), w(j)))
        }
    };
    for ker in fast_kernels() {
        let chunk = [1, 3, 64][io.m % 3];
        let got = run_q(&ker, q, io, chunk);
        io.check(
            &got,
            &want,
            tol,
            &format!("{what}: {} vs reference", ker.qgemm_name),
        );
    }
}

const MS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 32];

fn groups(kp: usize) -> Vec<usize> {
    let mut g: Vec<usize> = [32, 64, 128]
        .into_iter()
        .filter(|g| kp.is_multiple_of(*g) && *g < kp)
        .collect();
    g.push(kp);
    g
}

/// The tables that make sense for `bits`.
fn tables(bits: usize) -> Vec<Table> {
    let mut t = vec![Table::Random, Table::RawI8];
    if bits >= 2 {
        t.push(Table::Linear);
    }
    match bits {
        1 => t.push(Table::Binary),
        2 => t.push(Table::Ternary),
        3 => t.push(Table::Affine3),
        8 => t.push(Table::Int8Rows),
        _ => {}
    }
    t
}

/// Every width, group size, table sharing, table kind and both activation paths, on random
/// ragged shapes; every m in `MS` for each width.
#[test]
fn block_quantized_matches_reference() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut cases = 0;
    for bits in 1..=8 {
        let mut combos = Vec::new();
        for int8 in [false, true] {
            for table in tables(bits) {
                for rpt_kind in 0..3 {
                    combos.push((int8, table, rpt_kind));
                }
            }
        }
        // Each m at least once, each combination at least once.
        let count = (2 * combos.len()).max(MS.len() * 3);
        for c in 0..count {
            let (int8, table, rpt_kind) = combos[c % combos.len()];
            let m = MS[c % MS.len()];
            let n = if c % 7 == 0 {
                rng.pick(&[1, 2, 3, 5])
            } else {
                1 + rng.below(40)
            };
            let k = if c % 5 == 0 {
                rng.pick(&[1, 31, 32, 33, 64, 96, 128, 160, 200])
            } else {
                1 + rng.below(200)
            };
            let kp = k.div_ceil(BLOCK) * BLOCK;
            let group = rng.pick(&groups(kp));
            let rpt = [1, 3, n][rpt_kind];
            let q = QCase::new(&mut rng, n, k, bits, group, rpt, int8, table);
            let io = Io::new(&mut rng, m, n, k);
            check_q(
                &q,
                &io,
                &format!("bits={bits} group={group} rpt={rpt} int8={int8} {table:?}"),
            );
            cases += 1;
        }
    }
    assert!(cases >= 8 * 30);
}

/// Every group size and table sharing for the widths with dedicated fast paths, at GEMV and
/// GEMM shapes with k crossing superblock boundaries.
#[test]
fn superblock_widths_all_groups() {
    let mut rng = Rng(5);
    for bits in [1, 2, 4, 8] {
        for k in [32usize, 64, 96, 128, 160, 192, 200, 256] {
            let kp = k.div_ceil(BLOCK) * BLOCK;
            for group in groups(kp) {
                for table in tables(bits) {
                    let m = rng.pick(&[1, 1, 4, 5, 9]);
                    let n = rng.pick(&[1, 4, 7, 9]);
                    let rpt = rng.pick(&[1, 3, n]);
                    let q = QCase::new(&mut rng, n, k, bits, group, rpt, true, table);
                    let io = Io::new(&mut rng, m, n, k);
                    check_q(
                        &q,
                        &io,
                        &format!("bits={bits} k={k} group={group} rpt={rpt} {table:?}"),
                    );
                }
            }
        }
    }
}

/// GEMV (int8 activations) with the widths of the AVX-512 kernels: each way a row ends (whole
/// two-superblock chunks, a partial chunk, a whole or partial lone superblock shared by two
/// rows), fewer rows than a tile, one tile, several with the last one overlapping, each group
/// size, table sharing (tables spanning tiles included), and every way a tile's outputs leave
/// it: bias or none, row- or column-major C, identity or not.
#[test]
fn gemv_tiles_every_output_path() {
    let mut rng = Rng(16);
    let outputs = [
        (true, false, Activation::NONE),
        (false, false, Activation::NONE),
        (true, true, Activation::NONE),
        (true, false, Activation::plain(ActKind::Relu)),
    ];
    let mut case = 0usize;
    for bits in [1, 2, 4] {
        // For 1, 2 and 4 bits: a lone partial superblock, a partial chunk, a lone whole
        // superblock, chunks then a lone one, chunks then a partial one.
        for k in [64usize, 96, 128, 160, 384, 416] {
            for n in [5usize, 9, 16, 37] {
                for table in tables(bits) {
                    let gs = groups(k.div_ceil(BLOCK) * BLOCK);
                    let group = gs[case % gs.len()];
                    let rpt = [1, 3, 16, n][case / 3 % 4];
                    let (bias, col_major, act) = outputs[case % outputs.len()];
                    case += 1;
                    let q = QCase::new(&mut rng, n, k, bits, group, rpt, true, table);
                    let mut io = Io::new(&mut rng, 1, n, k).with_c(col_major);
                    io.bias = bias.then(|| rng.vec(n));
                    io.act = act;
                    check_q(
                        &q,
                        &io,
                        &format!("bits={bits} n={n} k={k} group={group} rpt={rpt} {table:?} bias={bias} col={col_major} {act:?}"),
                    );
                }
            }
        }
    }
}

/// Row-tiled layouts: 2-bit affine codes (ternary, int2 levels, a slope) and 4-bit codes with
/// one table per tile (per tensor, per 16 or 32 rows) take the row-tiled kernels, anything else
/// (per-row tables, 1 bit) the reference; rows that end inside a tile, ragged k, every group
/// size, each m up to 6 and 32, both activation paths, and each way outputs leave.
#[test]
fn row_tiles_match_reference() {
    let mut rng = Rng(21);
    let outputs = [
        (true, false, Activation::NONE),
        (false, true, Activation::plain(ActKind::Relu)),
        (false, false, Activation::plain(ActKind::Tanh)),
    ];
    let mut case = 0usize;
    for bits in [2usize, 2, 2, 1, 4, 4, 4] {
        for n in [1usize, 5, 16, 17, 37, 48] {
            for k in [1usize, 32, 65, 200, 384] {
                let kp = k.div_ceil(BLOCK) * BLOCK;
                let gs = groups(kp);
                let group = gs[case % gs.len()];
                let table = match bits {
                    2 => [Table::Ternary, Table::Linear, Table::Affine3, Table::Random][case % 4],
                    _ => rng.pick(&tables(bits)),
                };
                // One table (the affine kernels), or several: one per tile or tiles (the
                // 4-bit kernels), or tables a tile's rows do not share (the reference).
                let rpt = match (bits, case % 5) {
                    (4, 0) => 16,
                    (4, 1) => 32,
                    (4, 2) => 1,
                    (_, 4) => 3,
                    _ => n,
                };
                let int8 = case % 4 != 3;
                let flags = QFLAG_ROW_TILES | if int8 { QFLAG_INT8_ACTIVATIONS } else { 0 };
                let (bias, col_major, act) = outputs[case % outputs.len()];
                let m = [1, 2, 3, 4, 5, 6, 32][case % 7];
                case += 1;
                let q = QCase::with_flags(&mut rng, n, k, bits, group, rpt, flags, table);
                let mut io = Io::new(&mut rng, m, n, k).with_c(col_major);
                io.bias = bias.then(|| rng.vec(n));
                io.act = act;
                check_q(
                    &q,
                    &io,
                    &format!("tiled bits={bits} m={m} n={n} k={k} group={group} rpt={rpt} int8={int8} {table:?} bias={bias} col={col_major}"),
                );
            }
        }
    }
}

/// f32 activations with enough rows to decode panels: k across several 256-input panels (ragged
/// tails), m across the 96-row blocks, n across 16-row panels, every width and group size.
#[test]
fn panels_cross_k_and_row_blocks() {
    let mut rng = Rng(13);
    for bits in 1..=8 {
        for (m, n, k) in [
            (8usize, 17usize, 300usize),
            (13, 16, 257),
            (100, 33, 520),
            (9, 1, 600),
            (97, 15, 255),
        ] {
            let kp = k.div_ceil(BLOCK) * BLOCK;
            let group = rng.pick(&groups(kp));
            let table = rng.pick(&tables(bits));
            let rpt = rng.pick(&[1, 3, n]);
            let q = QCase::new(&mut rng, n, k, bits, group, rpt, false, table);
            let io = Io::new(&mut rng, m, n, k).with_c(m % 2 == 1);
            check_q(
                &q,
                &io,
                &format!("bits={bits} m={m} n={n} k={k} group={group} rpt={rpt} {table:?}"),
            );
        }
    }
}

/// The checks catch one wrong term: a reference result perturbed by one product fails.
#[test]
#[should_panic(expected = "perturbed")]
fn check_catches_one_wrong_term() {
    let mut rng = Rng(7);
    let (m, n, k) = (3, 9, 200);
    let q = QCase::new(&mut rng, n, k, 4, 32, 1, false, Table::Random);
    let mut io = Io::new(&mut rng, m, n, k);
    io.act = Activation::NONE;
    let want = run_q(&Kernels::reference(), &q, &io, 64);
    let mut wrong = want.clone();
    let (i, j, kk) = (2, 5, 77);
    wrong[io.at(i, j)] += io.x(i)[kk] * q.w[j * k + kk];
    let tol = |i: usize, j: usize| REL * (1.0 + absdot(io.x(i), &q.w[j * k..(j + 1) * k]));
    io.check(&wrong, &want, tol, "perturbed");
}

// ---------------------------------------------------------------------------------------------
// N:M sparse
// ---------------------------------------------------------------------------------------------

/// An N:M sparse weight and its dense values.
struct SCase {
    layout: SparseLayout,
    bytes: Vec<u8>,
    w: Vec<f32>,
}

impl SCase {
    fn new(rng: &mut Rng, n: usize, k: usize, keep: usize, m: usize) -> SCase {
        let l =
            SparseLayout::new(n, k, [keep as u32, m as u32, 0, 0]).expect("valid sparse layout");
        let mut bytes = vec![0u8; l.len];
        let mut w = vec![0f32; n * k];
        let per_row = l.per_row();
        for r in 0..n {
            let mut bits = vec![0u8; l.pos_row_bytes];
            for g in 0..k / m {
                // `keep` distinct positions, ascending (as the encoder writes them).
                let mut pos: Vec<usize> = (0..m).collect();
                for i in 0..m {
                    pos.swap(i, i + rng.below(m - i));
                }
                let mut kept = pos[..keep].to_vec();
                kept.sort();
                for (i, &p) in kept.iter().enumerate() {
                    let v_idx = g * keep + i;
                    let v = f16::from_f32(rng.f32());
                    let o = (r * per_row + v_idx) * 2;
                    bytes[o..o + 2].copy_from_slice(&v.to_bits().to_le_bytes());
                    w[r * k + g * m + p] = v.to_f32();
                    let bit = v_idx * l.pos_bits;
                    for b in 0..l.pos_bits {
                        if p >> b & 1 == 1 {
                            bits[(bit + b) / 8] |= 1 << ((bit + b) % 8);
                        }
                    }
                }
            }
            let o = l.pos_off + r * l.pos_row_bytes;
            bytes[o..o + l.pos_row_bytes].copy_from_slice(&bits);
        }
        SCase {
            layout: l,
            bytes,
            w,
        }
    }
}

fn run_s(ker: &Kernels, s: &SCase, io: &Io) -> Vec<f32> {
    let mut c = vec![f32::NAN; io.c_len];
    qgemm::sparse_gemm(
        ker,
        &SparseWeights {
            layout: s.layout,
            bytes: &s.bytes,
        },
        io.g(&mut c),
    );
    c
}

#[test]
fn sparse_matches_reference() {
    let mut rng = Rng(99);
    for (keep, mm) in [(2, 4), (1, 4), (4, 8), (2, 16), (3, 8), (1, 2)] {
        for c in 0..24 {
            let m = MS[c % MS.len()];
            let n = 1 + rng.below(40);
            let groups = 1 + rng.below(200 / mm);
            let k = groups * mm;
            let s = SCase::new(&mut rng, n, k, keep, mm);
            let io = Io::new(&mut rng, m, n, k);
            let w = |j: usize| &s.w[j * k..(j + 1) * k];
            let tol = |i: usize, j: usize| REL * (1.0 + absdot(io.x(i), w(j)));
            let want = run_s(&Kernels::reference(), &s, &io);
            let dense = io.finish(|i, j| dot(io.x(i), w(j)));
            let what = format!("{keep}:{mm} k={k}");
            io.check(&want, &dense, tol, &format!("{what}: reference vs Σ xw"));
            for ker in fast_kernels() {
                io.check(
                    &run_s(&ker, &s, &io),
                    &want,
                    tol,
                    &format!("{what}: {} vs reference", ker.qgemm_name),
                );
            }
        }
    }
}

/// 2:4 with enough activation rows to decode panels: k across 256-input panels with ragged ends
/// (k a multiple of 4, not of 16), m across the 96-row blocks, n across 16-row panels.
#[test]
fn sparse_2_4_panels_match_reference() {
    let mut rng = Rng(77);
    for (m, n, k) in [
        (8usize, 17usize, 260usize),
        (13, 16, 1000),
        (100, 33, 516),
        (9, 1, 36),
        (97, 20, 256),
        (32, 40, 12),
    ] {
        let s = SCase::new(&mut rng, n, k, 2, 4);
        for col_major in [false, true] {
            let io = Io::new(&mut rng, m, n, k).with_c(col_major);
            let w = |j: usize| &s.w[j * k..(j + 1) * k];
            let tol = |i: usize, j: usize| REL * (1.0 + absdot(io.x(i), w(j)));
            let want = run_s(&Kernels::reference(), &s, &io);
            for ker in fast_kernels() {
                io.check(
                    &run_s(&ker, &s, &io),
                    &want,
                    tol,
                    &format!(
                        "2:4 m={m} n={n} k={k} col_major={col_major}: {}",
                        ker.qgemm_name
                    ),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Threads, kernel choice
// ---------------------------------------------------------------------------------------------

/// Two threads give exactly the one-thread result, for splits by outputs and by rows, with
/// tables that force uneven output splits.
#[cfg(feature = "std")]
#[test]
fn threaded_matches_single_threaded() {
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = Rng(11);
    let mut cases = Vec::new();
    for (m, n, k, bits, rpt, int8) in [
        (1usize, 2048usize, 512usize, 4usize, 1usize, true),
        (1, 2047, 520, 4, 2047, true),
        (1, 1001, 1100, 2, 300, true),
        (1, 1500, 700, 3, 7, false),
        (40, 300, 200, 4, 300, true),
        (33, 301, 256, 8, 301, false),
        (100, 300, 600, 4, 1, false),
        (40, 64, 300, 3, 64, false),
    ] {
        let kp = k.div_ceil(BLOCK) * BLOCK;
        let q = QCase::new(&mut rng, n, k, bits, kp, rpt, int8, Table::Random);
        cases.push((m, n, k, bits, rpt, q));
    }
    // Row-tiled ternary: whole tiles per thread, the last one partial.
    for (m, n, k) in [
        (1usize, 1537usize, 384usize),
        (1, 385, 1536),
        (32, 200, 416),
    ] {
        let flags = QFLAG_ROW_TILES | QFLAG_INT8_ACTIVATIONS;
        let q = QCase::with_flags(&mut rng, n, k, 2, 32, n, flags, Table::Ternary);
        cases.push((m, n, k, 2, n, q));
    }
    // Row-tiled 4-bit codebooks, a table per 16 or 32 rows: pieces must not split a table.
    for (m, n, k, rpt) in [
        (1usize, 1537usize, 384usize, 16usize),
        (1, 385, 1536, 32),
        (32, 200, 448, 16),
    ] {
        let flags = QFLAG_ROW_TILES | QFLAG_INT8_ACTIVATIONS;
        let q = QCase::with_flags(&mut rng, n, k, 4, 64, rpt, flags, Table::Random);
        cases.push((m, n, k, 4, rpt, q));
    }
    for (m, n, k, bits, rpt, q) in cases {
        for col_major in [false, true] {
            let io = Io::new(&mut rng, m, n, k).with_c(col_major);
            for ker in [Kernels::best(), Kernels::reference()] {
                let single = run_q(&ker, &q, &io, 64);
                let threaded = two.install(|| run_q(&ker.with_threads(2), &q, &io, 64));
                assert!(
                    single.iter().zip(&threaded).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} m={m} n={n} k={k} bits={bits} rpt={rpt} col_major={col_major}: threaded result differs",
                    ker.qgemm_name
                );
            }
        }
    }
    let s = SCase::new(&mut rng, 1500, 800, 2, 4);
    for m in [1, 40] {
        for col_major in [false, true] {
            let io = Io::new(&mut rng, m, 1500, 800).with_c(col_major);
            let ker = Kernels::best();
            let single = run_s(&ker, &s, &io);
            let threaded = two.install(|| run_s(&ker.with_threads(2), &s, &io));
            assert!(
                single
                    .iter()
                    .zip(&threaded)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "sparse m={m} col_major={col_major}"
            );
        }
    }
}

/// The architecture's compressed-weight kernels are the ones chosen where they exist.
#[test]
fn best_picks_the_architecture_kernels() {
    let best = Kernels::best();
    println!("best: {best:?}");
    #[cfg(target_arch = "aarch64")]
    assert!(
        best.qgemm_name.starts_with("aarch64-neon"),
        "{}",
        best.qgemm_name
    );
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        let has = |f: &[bool]| f.iter().all(|&b| b);
        let want = if has(&[
            std::is_x86_feature_detected!("avx512f"),
            std::is_x86_feature_detected!("avx512bw"),
            std::is_x86_feature_detected!("avx512vl"),
            std::is_x86_feature_detected!("avx512vnni"),
        ]) {
            "x86_64-avx512-vnni"
        } else if std::is_x86_feature_detected!("avxvnni") {
            "x86_64-avx-vnni"
        } else {
            "x86_64-avx2"
        };
        assert_eq!(best.qgemm_name, want);
    }
    assert_eq!(Kernels::reference().qgemm_name, "generic");
}

// ---------------------------------------------------------------------------------------------
// f16 panels
// ---------------------------------------------------------------------------------------------

/// `linear` with f16 panels against the f32 GEMM on the same (f16-rounded) weights: the same
/// kernel family gives the same bits (widening is exact, the tiling identical), and the fast
/// kernels agree with the reference within rounding.
#[test]
fn panel_f16_matches_f32_gemm() {
    let mut rng = Rng(2024);
    for c in 0..120 {
        let m = MS[c % MS.len()];
        let n = 1 + rng.below(40);
        let k = 1 + rng.below(200);
        // W is n × k; B = Wᵀ (k × n) packed in panels of NR columns.
        let w: Vec<f32> = (0..n * k).map(|_| f16_round(rng.f32())).collect();
        let mut panel = vec![f32::NAN; gemm::packed_len(k, n)];
        gemm::pack_b(k, n, &w, 1, k, &mut panel);
        let panel16: Vec<u16> = panel.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
        assert_eq!(panel16.len() % NR, 0);
        let io = Io::new(&mut rng, m, n, k);
        let run = |ker: &Kernels, wts: &Weights<'_>| {
            let mut c = vec![f32::NAN; io.c_len];
            linear(
                ker,
                wts,
                (m, k, n),
                (&io.a, io.a_rs, 1),
                (&mut c, io.c_rs, io.c_cs),
                io.bias.as_deref(),
                io.act,
                &mut [],
            );
            c
        };
        let same_bits =
            |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits());
        let wf = |j: usize| &w[j * k..(j + 1) * k];
        let tol = |i: usize, j: usize| 1e-5 * (1.0 + absdot(io.x(i), wf(j)));
        let reference = Kernels::reference();
        let want = run(&reference, &Weights::Panel(&panel));
        let dense = io.finish(|i, j| dot(io.x(i), wf(j)));
        io.check(&want, &dense, tol, "f32 reference vs Σ xw");
        assert!(
            same_bits(&run(&reference, &Weights::PanelF16(&panel16)), &want),
            "f16 reference differs from f32 reference"
        );
        for ker in fast_kernels() {
            let f16 = run(&ker, &Weights::PanelF16(&panel16));
            assert!(
                same_bits(&f16, &run(&ker, &Weights::Panel(&panel))),
                "{}: f16 differs from f32",
                ker.gemm_f16.name
            );
            io.check(
                &f16,
                &want,
                tol,
                &format!("{} f16 vs reference", ker.gemm_f16.name),
            );
        }
    }
}

/// f16 panels through the threaded frame give the one-thread bits.
#[cfg(feature = "std")]
#[test]
fn panel_f16_threaded_matches_single_threaded() {
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = Rng(77);
    let (m, n, k) = (40, 300, 200);
    let w: Vec<u16> = (0..gemm::packed_len(k, n))
        .map(|_| f16::from_f32(rng.f32()).to_bits())
        .collect();
    let io = Io::new(&mut rng, m, n, k);
    let ker = Kernels::best();
    let run = |ker: &Kernels| {
        let mut c = vec![f32::NAN; io.c_len];
        linear(
            ker,
            &Weights::PanelF16(&w),
            (m, k, n),
            (&io.a, io.a_rs, 1),
            (&mut c, io.c_rs, io.c_cs),
            io.bias.as_deref(),
            io.act,
            &mut [],
        );
        c
    };
    let single = run(&ker);
    let threaded = two.install(|| run(&ker.with_threads(2)));
    assert!(single
        .iter()
        .zip(&threaded)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// The fast activation quantizers write exactly the reference's bytes, including ties, NaN,
/// infinities, signed zeros, subnormals and ragged ends.
#[test]
fn fast_quantize_matches_reference() {
    let mut rng = Rng(31);
    let specials = [
        0.5,
        -0.5,
        1.5,
        -2.5,
        126.5,
        -126.5,
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        -1e-42,
        127.0,
        -127.0,
    ];
    for c in 0..400 {
        let k = 1 + rng.below(200);
        let mut x = rng.vec(k);
        match c % 5 {
            // Block maxima of exactly 127 make x/d = x: exact ties at .5.
            0 => {
                for (i, v) in x.iter_mut().enumerate() {
                    *v = if i % BLOCK == 0 {
                        127.0
                    } else {
                        (rng.below(255) as f32 - 127.0) + 0.5 * (rng.below(2) as f32)
                    };
                }
            }
            1 => {
                for v in x.iter_mut() {
                    if rng.below(4) == 0 {
                        *v = specials[rng.below(specials.len())];
                    }
                }
            }
            2 => x.iter_mut().for_each(|v| *v *= 1e-30),
            3 => x.iter_mut().for_each(|v| *v = 0.0),
            _ => {}
        }
        let rb = q8_row_bytes(k);
        let mut want = vec![0xAAu8; rb];
        qgemm::quantize_q8(&x, &mut want);
        for ker in fast_kernels() {
            let mut got = vec![0x55u8; rb];
            (ker.quantize_q8)(&x, &mut got);
            assert_eq!(got, want, "{}: k={k} case {}", ker.qgemm_name, c % 5);
        }
    }
}
