//! 2-D convolution over NCHW activations.
//!
//! Three paths: pointwise (1×1) convolutions are one GEMM per image read in place through
//! strides; other dense convolutions unroll a tile of output pixels (im2col) into the planned
//! scratch and run a GEMM per tile; depthwise convolutions run directly. A direct loop over plain
//! weights is the reference for all of them and serves grouped convolutions.

use edgetune_core::ops::Conv;

use super::linear::{linear, Weights};
use super::Kernels;
use crate::math;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvShape {
    /// Images.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Output height.
    pub ho: usize,
    /// Output width.
    pub wo: usize,
}

/// Runs a convolution. `scratch` must hold the im2col tile when `c.col_tile > 0`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    ker: &Kernels,
    c: &Conv,
    s: &ConvShape,
    x: &[f32],
    w: Weights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut [u8],
) {
    let depthwise = c.groups > 1 && c.groups as usize == s.cin && s.cout == s.cin;
    match w {
        Weights::Plain(w) if depthwise => depthwise_conv(c, s, x, w, bias, y),
        Weights::Plain(w) => direct_conv(c, s, x, w, bias, y),
        w => gemm_conv(ker, c, s, x, &w, bias, y, scratch),
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_conv(
    ker: &Kernels,
    c: &Conv,
    s: &ConvShape,
    x: &[f32],
    w: &Weights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut [u8],
) {
    let (kh, kw) = (c.kernel[0] as usize, c.kernel[1] as usize);
    let k = s.cin * kh * kw;
    let p = s.ho * s.wo;
    let plane = s.h * s.w;
    let tile = c.col_tile as usize;
    // Scratch: the im2col tile (f32), then room for int8 activation rows.
    let (cols, rest) = scratch.split_at_mut((k * tile * 4).min(scratch.len()));
    // SAFETY: f32 has no invalid bit patterns; `align_to_mut` only yields the aligned middle.
    let (head, cols, _) = unsafe { cols.align_to_mut::<f32>() };
    assert!(head.is_empty(), "conv: scratch not aligned for f32");
    for b in 0..s.n {
        let xb = &x[b * s.cin * plane..(b + 1) * s.cin * plane];
        let yb = &mut y[b * s.cout * p..(b + 1) * s.cout * p];
        if tile == 0 {
            // Pointwise on panels: A[pixel, ci] = x[ci·P + pixel] read in place.
            linear(
                ker,
                w,
                (p, k, s.cout),
                (xb, 1, plane),
                (yb, 1, p),
                bias,
                c.act,
                rest,
            );
            continue;
        }
        let mut p0 = 0;
        while p0 < p {
            let rows = tile.min(p - p0);
            im2col(c, s, xb, p0, rows, &mut cols[..rows * k]);
            linear(
                ker,
                w,
                (rows, k, s.cout),
                (&cols[..rows * k], k, 1),
                (&mut yb[p0..], 1, p),
                bias,
                c.act,
                rest,
            );
            p0 += rows;
        }
    }
}

/// Unrolls output pixels `p0..p0+rows` of one image into rows of `(ci, ky, kx)` patches.
fn im2col(c: &Conv, s: &ConvShape, x: &[f32], p0: usize, rows: usize, out: &mut [f32]) {
    let (kh, kw) = (c.kernel[0] as usize, c.kernel[1] as usize);
    let k = s.cin * kh * kw;
    for (r, row) in out.chunks_exact_mut(k).take(rows).enumerate() {
        let (oy, ox) = ((p0 + r) / s.wo, (p0 + r) % s.wo);
        let y0 = (oy * c.stride[0] as usize) as isize - c.pads[0] as isize;
        let x0 = (ox * c.stride[1] as usize) as isize - c.pads[1] as isize;
        let mut j = 0;
        for ci in 0..s.cin {
            let xp = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
            for ky in 0..kh {
                let iy = y0 + (ky * c.dilation[0] as usize) as isize;
                for kx in 0..kw {
                    let ix = x0 + (kx * c.dilation[1] as usize) as isize;
                    row[j] = if iy >= 0 && iy < s.h as isize && ix >= 0 && ix < s.w as isize {
                        xp[iy as usize * s.w + ix as usize]
                    } else {
                        0.0
                    };
                    j += 1;
                }
            }
        }
    }
}

fn depthwise_conv(
    c: &Conv,
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (kh, kw) = (c.kernel[0] as usize, c.kernel[1] as usize);
    let (sh, sw) = (c.stride[0] as usize, c.stride[1] as usize);
    let (dh, dw) = (c.dilation[0] as usize, c.dilation[1] as usize);
    let (pt, pl) = (c.pads[0] as isize, c.pads[1] as isize);
    let plane = s.h * s.w;
    let p = s.ho * s.wo;
    // Output columns whose input column `ox·sw + kx·dw − pl` is inside the row, per kx.
    let mut cols = [(0usize, 0usize); 16];
    let col_range = |kx: usize| -> (usize, usize) {
        let off = (kx * dw) as isize - pl;
        let lo = if off >= 0 {
            0
        } else {
            ((-off) as usize).div_ceil(sw)
        }
        .min(s.wo);
        let hi = if (s.w as isize) <= off {
            0
        } else {
            ((s.w as isize - off) as usize).div_ceil(sw).min(s.wo)
        };
        (lo, hi.max(lo))
    };
    let ranges: &[(usize, usize)] = if kw <= cols.len() {
        for (kx, r) in cols.iter_mut().enumerate().take(kw) {
            *r = col_range(kx);
        }
        &cols[..kw]
    } else {
        &[]
    };
    for b in 0..s.n {
        for ch in 0..s.cin {
            let xp = &x[(b * s.cin + ch) * plane..(b * s.cin + ch + 1) * plane];
            let yp = &mut y[(b * s.cout + ch) * p..(b * s.cout + ch + 1) * p];
            let wk = &w[ch * kh * kw..(ch + 1) * kh * kw];
            let b0 = bias.map_or(0.0, |b| b[ch]);
            for oy in 0..s.ho {
                let out = &mut yp[oy * s.wo..(oy + 1) * s.wo];
                out.iter_mut().for_each(|v| *v = b0);
                for ky in 0..kh {
                    let iy = (oy * sh + ky * dh) as isize - pt;
                    if iy < 0 || iy >= s.h as isize {
                        continue;
                    }
                    let row = &xp[iy as usize * s.w..(iy as usize + 1) * s.w];
                    for kx in 0..kw {
                        let wv = wk[ky * kw + kx];
                        let (lo, hi) = if ranges.is_empty() {
                            col_range(kx)
                        } else {
                            ranges[kx]
                        };
                        let base = (kx * dw) as isize - pl;
                        if lo == hi {
                            continue;
                        }
                        if sw == 1 {
                            // Contiguous: the compiler vectorises this.
                            let start = (lo as isize + base) as usize;
                            for (o, &v) in
                                out[lo..hi].iter_mut().zip(&row[start..start + (hi - lo)])
                            {
                                *o += wv * v;
                            }
                        } else {
                            for (ox, o) in out.iter_mut().enumerate().take(hi).skip(lo) {
                                *o += wv * row[((ox * sw) as isize + base) as usize];
                            }
                        }
                    }
                }
                math::apply_slice(&c.act, out);
            }
        }
    }
}

/// The reference: a direct loop over plain weights, any grouping.
pub fn direct_conv(
    c: &Conv,
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let g = c.groups as usize;
    let (cin_g, cout_g) = (s.cin / g, s.cout / g);
    let (kh, kw) = (c.kernel[0] as usize, c.kernel[1] as usize);
    let k = cin_g * kh * kw;
    let plane = s.h * s.w;
    let p = s.ho * s.wo;
    for b in 0..s.n {
        for co in 0..s.cout {
            let gi = co / cout_g;
            let wr = &w[co * k..(co + 1) * k];
            let b0 = bias.map_or(0.0, |b| b[co]);
            for oy in 0..s.ho {
                let y0 = (oy * c.stride[0] as usize) as isize - c.pads[0] as isize;
                for ox in 0..s.wo {
                    let x0 = (ox * c.stride[1] as usize) as isize - c.pads[1] as isize;
                    let mut acc = 0.0f32;
                    for ci in 0..cin_g {
                        let xp = &x[(b * s.cin + gi * cin_g + ci) * plane..][..plane];
                        for ky in 0..kh {
                            let iy = y0 + (ky * c.dilation[0] as usize) as isize;
                            if iy < 0 || iy >= s.h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = x0 + (kx * c.dilation[1] as usize) as isize;
                                if ix < 0 || ix >= s.w as isize {
                                    continue;
                                }
                                acc += xp[iy as usize * s.w + ix as usize]
                                    * wr[(ci * kh + ky) * kw + kx];
                            }
                        }
                    }
                    y[(b * s.cout + co) * p + oy * s.wo + ox] = math::apply(&c.act, acc + b0);
                }
            }
        }
    }
}
