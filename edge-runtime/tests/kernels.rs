//! Kernels against plain definitions on random shapes, ragged tails included.

use edgetune_core::ops::{Conv, MatMul, Pool};
use edgetune_core::{ActKind, Activation, BinaryKind, ReduceKind, Shape};
use edgetune_runtime::kernels::conv::{conv2d, direct_conv, ConvShape};
use edgetune_runtime::kernels::elementwise::{arith, broadcast_strides, Runs};
use edgetune_runtime::kernels::gemm::{pack_b, packed_len};
use edgetune_runtime::kernels::linear::{dense, matmul, Weights};
use edgetune_runtime::kernels::norm::{layer_norm, reduce, softmax};
use edgetune_runtime::kernels::pool::pool2d;
use edgetune_runtime::kernels::Kernels;

/// A zeroed, 4-byte aligned byte buffer (scratch that also holds f32).
fn scratch_bytes(n: usize) -> Vec<u32> {
    vec![0u32; n.div_ceil(4)]
}

fn as_bytes(v: &mut [u32]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length covers the same bytes.
    unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 4) }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

/// Packs `w[n][k]` (row per output) the way the `.etm` panel layout stores it.
fn panels(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; packed_len(k, n)];
    pack_b(k, n, w, 1, k, &mut out);
    out
}

#[test]
fn panel_packing_matches_layout() {
    // Panel p, row kk holds w[16p + j][kk].
    let (n, k) = (19, 3);
    let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
    let p = panels(&w, n, k);
    assert_eq!(p.len(), 2 * k * 16);
    assert_eq!(p[0], w[0]);
    assert_eq!(p[1], w[k]);
    assert_eq!(p[16], w[1]);
    assert_eq!(p[k * 16 + 2], w[18 * k]);
    assert_eq!(p[k * 16 + 3], 0.0);
}

#[test]
fn conv_paths_match_direct_reference() {
    let mut r = Rng(7);
    for kernels in [Kernels::reference(), Kernels::best()] {
        for case in 0..300 {
            let n = r.range(1, 2);
            let cin = r.range(1, 6);
            let cout = r.range(1, 37);
            let (h, w) = (r.range(1, 10), r.range(1, 10));
            let kernel = [r.range(1, 3) as u32, r.range(1, 3) as u32];
            let stride = [r.range(1, 2) as u32, r.range(1, 2) as u32];
            let dilation = [r.range(1, 2) as u32, r.range(1, 2) as u32];
            let pads = [
                r.below(3) as u32,
                r.below(3) as u32,
                r.below(3) as u32,
                r.below(3) as u32,
            ];
            let Some(ho) = edgetune_core::ops::window_out(
                h as u32,
                kernel[0],
                stride[0],
                pads[0],
                pads[2],
                dilation[0],
            ) else {
                continue;
            };
            let Some(wo) = edgetune_core::ops::window_out(
                w as u32,
                kernel[1],
                stride[1],
                pads[1],
                pads[3],
                dilation[1],
            ) else {
                continue;
            };
            let (ho, wo) = (ho as usize, wo as usize);
            let k = cin * kernel[0] as usize * kernel[1] as usize;
            let pointwise = kernel == [1, 1] && stride == [1, 1] && pads == [0; 4];
            let col_tile = if pointwise {
                0
            } else {
                r.range(1, ho * wo) as u32
            };
            let act = [
                Activation::NONE,
                Activation::plain(ActKind::Relu),
                Activation {
                    kind: ActKind::Clip,
                    a: -0.2,
                    b: 0.3,
                },
            ][case % 3];
            let c = Conv {
                kernel,
                stride,
                pads,
                dilation,
                groups: 1,
                act,
                col_tile,
            };
            let s = ConvShape {
                n,
                cin,
                h,
                w,
                cout,
                ho,
                wo,
            };
            let x = r.vec(n * cin * h * w);
            let wt = r.vec(cout * k);
            let bias = r.vec(cout);
            let mut want = vec![0.0; n * cout * ho * wo];
            direct_conv(&c, &s, &x, &wt, Some(&bias), &mut want);
            let mut got = vec![f32::NAN; want.len()];
            let mut scratch = scratch_bytes(k * col_tile as usize * 4);
            let packed = panels(&wt, cout, k);
            conv2d(
                &kernels,
                &c,
                &s,
                &x,
                Weights::Panel(&packed),
                Some(&bias),
                &mut got,
                as_bytes(&mut scratch),
            );
            close(
                &got,
                &want,
                1e-5,
                &format!("conv case {case} ({})", kernels.gemm.name),
            );
        }
    }
}

#[test]
fn depthwise_and_grouped_match_direct_reference() {
    let mut r = Rng(11);
    for case in 0..100 {
        let groups = r.range(2, 6);
        let mult_in = if case % 2 == 0 { 1 } else { r.range(1, 3) };
        let mult_out = if case % 2 == 0 { 1 } else { r.range(1, 3) };
        let (cin, cout) = (groups * mult_in, groups * mult_out);
        let (h, w) = (r.range(2, 9), r.range(2, 9));
        let c = Conv {
            kernel: [3, 3],
            stride: [r.range(1, 2) as u32, 1],
            pads: [1; 4],
            dilation: [1, 1],
            groups: groups as u32,
            act: Activation::NONE,
            col_tile: 0,
        };
        let ho =
            edgetune_core::ops::window_out(h as u32, 3, c.stride[0], 1, 1, 1).unwrap() as usize;
        let s = ConvShape {
            n: 1,
            cin,
            h,
            w,
            cout,
            ho,
            wo: w,
        };
        let x = r.vec(cin * h * w);
        let wt = r.vec(cout * mult_in * 9);
        let bias = r.vec(cout);
        // Independent naive definition.
        let mut want = vec![0.0; cout * ho * w];
        for co in 0..cout {
            let g = co / mult_out;
            for oy in 0..ho {
                for ox in 0..w {
                    let mut acc = bias[co];
                    for ci in 0..mult_in {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (oy * c.stride[0] as usize + ky) as isize - 1;
                                let ix = (ox + kx) as isize - 1;
                                if iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize {
                                    acc += x
                                        [((g * mult_in + ci) * h + iy as usize) * w + ix as usize]
                                        * wt[(co * mult_in + ci) * 9 + ky * 3 + kx];
                                }
                            }
                        }
                    }
                    want[(co * ho + oy) * w + ox] = acc;
                }
            }
        }
        let mut got = vec![0.0; want.len()];
        conv2d(
            &Kernels::best(),
            &c,
            &s,
            &x,
            Weights::Plain(&wt),
            Some(&bias),
            &mut got,
            &mut [],
        );
        close(&got, &want, 1e-5, &format!("grouped case {case}"));
    }
}

#[test]
fn depthwise_matches_direct_reference_on_random_geometry() {
    let mut r = Rng(17);
    let mut checked = 0;
    for case in 0..400 {
        let ch = r.range(1, 5);
        let (h, w) = (r.range(1, 12), r.range(1, 12));
        let kernel = [r.range(1, 5) as u32, r.range(1, 5) as u32];
        let stride = [r.range(1, 3) as u32, r.range(1, 3) as u32];
        let dilation = [r.range(1, 2) as u32, r.range(1, 2) as u32];
        let pads = [0, 1, 2, 3].map(|_| r.below(3) as u32);
        let Some(ho) = edgetune_core::ops::window_out(
            h as u32,
            kernel[0],
            stride[0],
            pads[0],
            pads[2],
            dilation[0],
        ) else {
            continue;
        };
        let Some(wo) = edgetune_core::ops::window_out(
            w as u32,
            kernel[1],
            stride[1],
            pads[1],
            pads[3],
            dilation[1],
        ) else {
            continue;
        };
        let act = if case % 2 == 0 {
            Activation::NONE
        } else {
            Activation {
                kind: ActKind::HardSwish,
                a: 1.0 / 6.0,
                b: 0.5,
            }
        };
        let c = Conv {
            kernel,
            stride,
            pads,
            dilation,
            groups: ch as u32,
            act,
            col_tile: 0,
        };
        let s = ConvShape {
            n: 2,
            cin: ch,
            h,
            w,
            cout: ch,
            ho: ho as usize,
            wo: wo as usize,
        };
        let x = r.vec(2 * ch * h * w);
        let wt = r.vec(ch * (kernel[0] * kernel[1]) as usize);
        let bias = r.vec(ch);
        let mut want = vec![0.0; 2 * ch * s.ho * s.wo];
        direct_conv(&c, &s, &x, &wt, Some(&bias), &mut want);
        let mut got = vec![f32::NAN; want.len()];
        conv2d(
            &Kernels::best(),
            &c,
            &s,
            &x,
            Weights::Plain(&wt),
            Some(&bias),
            &mut got,
            &mut [],
        );
        close(&got, &want, 1e-5, &format!("depthwise case {case}"));
        checked += 1;
    }
    assert!(checked > 200);
}

#[test]
fn dense_panel_matches_plain() {
    let mut r = Rng(3);
    for case in 0..200 {
        let (m, k, n) = (r.range(1, 20), r.range(1, 70), r.range(1, 50));
        let x = r.vec(m * k);
        let w = r.vec(n * k);
        let b = r.vec(n);
        let act = if case % 2 == 0 {
            Activation::NONE
        } else {
            Activation::plain(ActKind::Gelu)
        };
        let mut want = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f32 = (0..k).map(|kk| x[i * k + kk] * w[j * k + kk]).sum();
                want[i * n + j] = edgetune_runtime::math::apply(&act, s + b[j]);
            }
        }
        for kernels in [Kernels::reference(), Kernels::best()] {
            let mut got = vec![0.0; m * n];
            dense(
                &kernels,
                &x,
                m,
                k,
                Weights::Panel(&panels(&w, n, k)),
                n,
                Some(&b),
                act,
                &mut got,
                &mut [],
            );
            close(&got, &want, 1e-5, &format!("dense panel {case}"));
            let mut got = vec![0.0; m * n];
            dense(
                &kernels,
                &x,
                m,
                k,
                Weights::Plain(&w),
                n,
                Some(&b),
                act,
                &mut got,
                &mut [],
            );
            close(&got, &want, 1e-5, &format!("dense plain {case}"));
        }
    }
}

#[test]
fn strided_batched_matmul_matches_naive() {
    // Attention layouts: a [b, m, h, k], b [b, n, h, k] (k last) -> y [b, h, m, n].
    let mut r = Rng(5);
    for case in 0..60 {
        let (bt, h, m, n, k) = (
            r.range(1, 3),
            r.range(1, 4),
            r.range(1, 19),
            r.range(1, 35),
            r.range(1, 20),
        );
        let b_batch = if case % 3 == 0 { 1 } else { bt };
        let a = r.vec(bt * m * h * k);
        let b = r.vec(b_batch * n * h * k);
        let mm = MatMul {
            a_m: 1,
            a_k: 3,
            b_k: 3,
            b_n: 1,
            y_m: 2,
            y_n: 3,
        };
        let (as_, bs, ys) = (
            Shape::new(&[bt, m, h, k]).unwrap(),
            Shape::new(&[b_batch, n, h, k]).unwrap(),
            Shape::new(&[bt, h, m, n]).unwrap(),
        );
        let mut want = vec![0.0; bt * h * m * n];
        for ib in 0..bt {
            let jb = if b_batch == 1 { 0 } else { ib };
            for ih in 0..h {
                for i in 0..m {
                    for j in 0..n {
                        let s: f32 = (0..k)
                            .map(|kk| {
                                a[((ib * m + i) * h + ih) * k + kk]
                                    * b[((jb * n + j) * h + ih) * k + kk]
                            })
                            .sum();
                        want[((ib * h + ih) * m + i) * n + j] = s;
                    }
                }
            }
        }
        for kernels in [Kernels::reference(), Kernels::best()] {
            let mut got = vec![0.0; want.len()];
            let mut scratch = vec![0.0; packed_len(k, n)];
            matmul(
                &kernels,
                &mm,
                &a,
                &as_,
                &b,
                &bs,
                &mut got,
                &ys,
                &mut scratch,
            );
            close(&got, &want, 1e-5, &format!("matmul {case}"));
        }
    }
}

#[test]
fn broadcast_binary_matches_naive() {
    let mut r = Rng(9);
    for case in 0..200 {
        let rank = r.range(1, 4);
        let out: Vec<usize> = (0..rank).map(|_| r.range(1, 5)).collect();
        // Each operand: some dims set to 1, possibly fewer leading dims.
        let operand = |r: &mut Rng| -> Vec<usize> {
            let drop = r.below(rank);
            out[drop..]
                .iter()
                .map(|&d| if r.below(3) == 0 { 1 } else { d })
                .collect()
        };
        let (sa, sb) = (operand(&mut r), operand(&mut r));
        let (a, b) = (r.vec(sa.iter().product()), r.vec(sb.iter().product()));
        let ys = Shape::new(&out).unwrap();
        let (ash, bsh) = (Shape::new(&sa).unwrap(), Shape::new(&sb).unwrap());
        let runs = Runs::new(
            &ys,
            [broadcast_strides(&ys, &ash), broadcast_strides(&ys, &bsh)],
        );
        let mut got = vec![0.0; ys.numel()];
        let kind = [
            BinaryKind::Add,
            BinaryKind::Sub,
            BinaryKind::Mul,
            BinaryKind::Max,
        ][case % 4];
        arith::<f32>(kind, &a, &b, &mut got, &runs);
        // Naive: index each operand from the output coordinates.
        let at = |s: &[usize], v: &[f32], idx: &[usize]| -> f32 {
            let off = idx.len() - s.len();
            let mut flat = 0;
            for (i, &d) in s.iter().enumerate() {
                flat = flat * d + if d == 1 { 0 } else { idx[off + i] };
            }
            v[flat]
        };
        for (o, g) in got.iter().enumerate() {
            let mut idx = vec![0; rank];
            let mut rem = o;
            for i in (0..rank).rev() {
                idx[i] = rem % out[i];
                rem /= out[i];
            }
            let (x, y) = (at(&sa, &a, &idx), at(&sb, &b, &idx));
            let want = match kind {
                BinaryKind::Add => x + y,
                BinaryKind::Sub => x - y,
                BinaryKind::Mul => x * y,
                _ => x.max(y),
            };
            assert_eq!(*g, want, "case {case} {sa:?} {sb:?} -> {out:?} at {idx:?}");
        }
    }
}

#[test]
fn softmax_norm_reduce_pool_match_definitions() {
    let mut r = Rng(13);
    // Softmax along the middle axis.
    let (outer, n, inner) = (3, 7, 5);
    let x = r.vec(outer * n * inner);
    let mut y = vec![0.0; x.len()];
    softmax(&x, &mut y, outer, n, inner);
    for o in 0..outer {
        for i in 0..inner {
            let e: Vec<f32> = (0..n).map(|j| x[(o * n + j) * inner + i].exp()).collect();
            let s: f32 = e.iter().sum();
            for j in 0..n {
                assert!((y[(o * n + j) * inner + i] - e[j] / s).abs() < 1e-6);
            }
        }
    }
    // Layer norm and RMS norm over rows of 33.
    let x = r.vec(4 * 33);
    let (g, b) = (r.vec(33), r.vec(33));
    for rms in [false, true] {
        let mut y = vec![0.0; x.len()];
        layer_norm(&x, &mut y, 33, Some(&g), Some(&b), 1e-5, rms);
        for row in 0..4 {
            let xs = &x[row * 33..(row + 1) * 33];
            let mean = if rms {
                0.0
            } else {
                xs.iter().map(|&v| v as f64).sum::<f64>() / 33.0
            };
            let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 33.0;
            for j in 0..33 {
                let want = ((xs[j] as f64 - mean) / (var + 1e-5).sqrt()) as f32 * g[j] + b[j];
                assert!((y[row * 33 + j] - want).abs() < 1e-5, "rms={rms}");
            }
        }
    }
    // Mean over axes 0 and 2 of [3, 4, 5].
    let xs = Shape::new(&[3, 4, 5]).unwrap();
    let x = r.vec(60);
    let mut y = vec![0.0; 4];
    reduce::<f32>(ReduceKind::Mean, &x, &xs, 0b101, &mut y);
    for j in 0..4 {
        let s: f32 = (0..3)
            .flat_map(|i| (0..5).map(move |k| (i, k)))
            .map(|(i, k)| x[(i * 4 + j) * 5 + k])
            .sum();
        assert!((y[j] - s / 15.0).abs() < 1e-6);
    }
    // Average pooling 3x3 stride 2 with padding, excluding pads from the count.
    let p = Pool {
        max: false,
        kernel: [3, 3],
        stride: [2, 2],
        pads: [1, 1, 1, 1],
        count_include_pad: false,
    };
    let x = r.vec(2 * 5 * 5);
    let mut y = vec![0.0; 2 * 3 * 3];
    pool2d(&p, &x, 2, 5, 5, &mut y, 3, 3);
    let (mut s, mut c) = (0.0, 0);
    for iy in 0..2 {
        for ix in 0..2 {
            s += x[iy * 5 + ix];
            c += 1;
        }
    }
    assert!((y[0] - s / c as f32).abs() < 1e-6);
}
