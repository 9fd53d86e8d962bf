//! Max and average pooling over NCHW activations.

use edgetune_core::ops::Pool;

/// Pools `x` (`[n·c, h, w]` planes) into `out` (`[n·c, ho, wo]`).
pub fn pool2d(
    p: &Pool,
    x: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    out: &mut [f32],
    ho: usize,
    wo: usize,
) {
    let (kh, kw) = (p.kernel[0] as usize, p.kernel[1] as usize);
    let (sh, sw) = (p.stride[0] as usize, p.stride[1] as usize);
    let (pt, pl) = (p.pads[0] as isize, p.pads[1] as isize);
    for c in 0..planes {
        let xp = &x[c * h * w..(c + 1) * h * w];
        let yp = &mut out[c * ho * wo..(c + 1) * ho * wo];
        for oy in 0..ho {
            let y0 = (oy * sh) as isize - pt;
            for ox in 0..wo {
                let x0 = (ox * sw) as isize - pl;
                let mut acc = if p.max { f32::NEG_INFINITY } else { 0.0 };
                let mut count = 0usize;
                for ky in 0..kh as isize {
                    let iy = y0 + ky;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..kw as isize {
                        let ix = x0 + kx;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let v = xp[iy as usize * w + ix as usize];
                        if p.max {
                            if v > acc || v.is_nan() {
                                acc = v;
                            }
                        } else {
                            acc += v;
                        }
                        count += 1;
                    }
                }
                yp[oy * wo + ox] = if p.max {
                    acc
                } else if p.count_include_pad {
                    // The window clipped to the padded input (ceil mode may run past it).
                    let ey =
                        ((y0 + kh as isize).min(h as isize + p.pads[2] as isize) - y0) as usize;
                    let ex =
                        ((x0 + kw as isize).min(w as isize + p.pads[3] as isize) - x0) as usize;
                    acc / (ey * ex) as f32
                } else {
                    acc / count.max(1) as f32
                };
            }
        }
    }
}
