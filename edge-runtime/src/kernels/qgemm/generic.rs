//! The reference kernels for compressed weights: plain loops that define the results.

use edgetune_core::layout::{block_code, BLOCK};
use edgetune_core::Activation;
use half::f16;

use super::{q8_row_bytes, QGemm, QWeights, SparseWeights};
use crate::math;

fn f16_bits(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

fn finish(acc: f32, j: usize, bias: Option<&[f32]>, act: &Activation) -> f32 {
    math::apply(act, acc + bias.map_or(0.0, |b| b[j]))
}

/// f32 activations: per group `acc_g = Σ x·lut[code]` (in `k` order), then
/// `acc += acc_g · scale`.
pub fn qgemm_f32(w: &QWeights<'_>, g: QGemm<'_>) {
    qgemm_f32_with(w, None, None, g)
}

/// Activation rows handled together: each block of codes is decoded once for all of them.
const ROWS: usize = 16;

/// [`qgemm_f32`] with an adapter's replacement tables (`[tables, 2^bits]`) and log-multipliers
/// of the group scales (`[N, groups]`): the one reference both paths share.
pub fn qgemm_f32_with(
    w: &QWeights<'_>,
    centroids: Option<&[f32]>,
    log_scales: Option<&[f32]>,
    g: QGemm<'_>,
) {
    let l = w.layout;
    let gpr = l.groups_per_row();
    let mut lut = [0f32; 256];
    let mut table = usize::MAX;
    let mut dec = [0f32; BLOCK];
    for n in 0..l.n {
        let t = n / l.rows_per_table;
        if t != table {
            for (c, v) in lut.iter_mut().enumerate().take(l.entries()) {
                *v = match centroids {
                    Some(cv) => cv[t * l.entries() + c],
                    None => f16_bits(w.lut_f16(t, c)),
                };
            }
            table = t;
        }
        for i0 in (0..g.m).step_by(ROWS) {
            let rows = ROWS.min(g.m - i0);
            let mut acc = [0f32; ROWS];
            for gi in 0..gpr {
                let mut acc_g = [0f32; ROWS];
                for b in gi * l.group / BLOCK..(gi + 1) * l.group / BLOCK {
                    let valid = BLOCK.min(l.k.saturating_sub(b * BLOCK));
                    let block = w.block(n, b);
                    for (e, d) in dec.iter_mut().enumerate().take(valid) {
                        *d = lut[block_code(&block, l.bits, e) as usize];
                    }
                    for (r, a) in acc_g.iter_mut().enumerate().take(rows) {
                        let x = &g.a
                            [(i0 + r) * g.a_rs + b * BLOCK..(i0 + r) * g.a_rs + b * BLOCK + valid];
                        for (xv, d) in x.iter().zip(&dec) {
                            *a += xv * d;
                        }
                    }
                }
                let mut s = f16_bits(w.scale_f16(n, gi));
                if let Some(ls) = log_scales {
                    s *= libm::expf(ls[n * gpr + gi]);
                }
                for (a, ag) in acc.iter_mut().zip(&acc_g).take(rows) {
                    *a += ag * s;
                }
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                g.c[(i0 + r) * g.c_rs + n * g.c_cs] = finish(*a, n, g.bias, &g.act);
            }
        }
    }
}

/// int8 activations: per block `acc += (Σ lut_i8[code]·q) · (d · scale)`, then
/// `y = acc · lut_scale`.
#[allow(clippy::too_many_arguments)]
pub fn qgemm_q8(
    w: &QWeights<'_>,
    rows: &[u8],
    m: usize,
    c: &mut [f32],
    c_rs: usize,
    c_cs: usize,
    bias: Option<&[f32]>,
    act: Activation,
) {
    let l = w.layout;
    let rb = q8_row_bytes(l.k);
    for i in 0..m {
        let (q, ds) = rows[i * rb..(i + 1) * rb].split_at(l.kp);
        for n in 0..l.n {
            let t = n / l.rows_per_table;
            let lut = w.lut_i8(t);
            let mut acc = 0.0f32;
            for b in 0..l.kp / BLOCK {
                let block = w.block(n, b);
                let mut isum = 0i32;
                for e in 0..BLOCK {
                    let wv = lut[block_code(&block, l.bits, e) as usize] as i8 as i32;
                    isum += wv * q[b * BLOCK + e] as i8 as i32;
                }
                let d = f32::from_le_bytes(ds[b * 4..b * 4 + 4].try_into().unwrap());
                let s = f16_bits(w.scale_f16(n, b * BLOCK / l.group));
                acc += isum as f32 * (d * s);
            }
            c[i * c_rs + n * c_cs] = finish(acc * w.lut_scale(t), n, bias, &act);
        }
    }
}

/// N:M sparse: `acc = Σ x[group·M + position] · value` in storage order.
pub fn sparse_gemm(w: &SparseWeights<'_>, g: QGemm<'_>) {
    let l = w.layout;
    let per_row = l.per_row();
    for i in 0..g.m {
        let x = &g.a[i * g.a_rs..i * g.a_rs + l.k];
        for n in 0..l.n {
            let vals = &w.bytes[n * per_row * 2..(n + 1) * per_row * 2];
            let pos =
                &w.bytes[l.pos_off + n * l.pos_row_bytes..l.pos_off + (n + 1) * l.pos_row_bytes];
            let mut acc = 0.0f32;
            for v in 0..per_row {
                let col = v / l.keep * l.m + l.position(pos, v);
                acc += x[col] * f16_bits(u16::from_le_bytes([vals[2 * v], vals[2 * v + 1]]));
            }
            g.c[i * g.c_rs + n * g.c_cs] = finish(acc, n, g.bias, &g.act);
        }
    }
}
