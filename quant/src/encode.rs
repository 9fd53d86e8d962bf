//! Lays compressed weights out as the `.etm` encodings (`edgetune_core::layout`) and reads them
//! back. Every encoder rounds tables and scales to f16 exactly as the file stores them, so what
//! [`decode`] returns is what the runtime computes with.
//!
//! ```
//! use edgetune_quant::encode::{decode, encode_groups};
//! use edgetune_quant::scalar::{quantize_groups, ScaleSearch};
//! let w: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 10.0).collect();
//! let q = quantize_groups(&w, 2, 32, 4, 32, None, ScaleSearch::Grid).unwrap();
//! let e = encode_groups(&q, true).unwrap();
//! let back = decode(&e, 2, 32).unwrap();
//! assert!(back.iter().zip(&w).all(|(a, b)| (a - b).abs() < 0.2));
//! ```

use edgetune_core::layout::{
    pack_block, QBlockLayout, SparseLayout, BLOCK, QFLAG_INT8_ACTIVATIONS, QFLAG_ROW_TILES,
};
use edgetune_core::Encoding;
use half::f16;

use crate::error::{QuantError, Result};
use crate::kmeans::Codebook;
use crate::scalar::{GroupQuant, Int8Rows};
use crate::ternary::{Binary, Ternary};

/// A weight in a file encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The encoding.
    pub encoding: Encoding,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Parameters stored with the tensor.
    pub params: [u32; 4],
}

/// `k` padded to whole blocks of 32.
pub fn padded_k(k: usize) -> usize {
    k.div_ceil(BLOCK) * BLOCK
}

/// Pads an `n × k` matrix (and optional per-column importance) with zero columns to `Kp`.
pub fn pad_columns(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let kp = padded_k(k);
    let mut out = vec![0.0; n * kp];
    for r in 0..n {
        out[r * kp..r * kp + k].copy_from_slice(&w[r * k..(r + 1) * k]);
    }
    out
}

/// Everything a block-quantized weight holds, before layout.
#[derive(Debug, Clone)]
pub struct QBlockParts<'a> {
    /// Rows.
    pub n: usize,
    /// Columns (unpadded).
    pub k: usize,
    /// Bits per code.
    pub bits: usize,
    /// Weights per scale along the padded row.
    pub group: usize,
    /// Rows per table.
    pub rows_per_table: usize,
    /// Multiply with int8-quantized activations.
    pub int8_activations: bool,
    /// Codes, row-major `n × k` (padding gets code 0).
    pub codes: &'a [u8],
    /// Tables, `⌈n/R⌉ × 2^bits` values.
    pub tables: &'a [f32],
    /// Scales, `n × Kp/group`.
    pub scales: &'a [f32],
}

/// Lays out a block-quantized weight.
pub fn encode_qblock(p: &QBlockParts<'_>) -> Result<Encoded> {
    let flags = if p.int8_activations {
        QFLAG_INT8_ACTIVATIONS
    } else {
        0
    };
    let params = [
        p.bits as u32,
        p.group as u32,
        p.rows_per_table as u32,
        flags,
    ];
    let l = QBlockLayout::new(p.n, p.k, params).ok_or(QuantError::Incompatible {
        what: "block-quantized layout parameters",
    })?;
    let entries = l.entries();
    if p.codes.len() != p.n * p.k
        || p.tables.len() != l.tables * entries
        || p.scales.len() != p.n * l.groups_per_row()
    {
        return Err(QuantError::ShapeMismatch {
            what: "codes, tables or scales",
            expected: p.n * p.k,
            got: p.codes.len(),
        });
    }
    if p.codes.iter().any(|&c| c as usize >= entries) {
        return Err(QuantError::OutOfRange {
            what: "code",
            value: entries as f64,
            allowed: "below 2^bits",
        });
    }
    if p.tables.iter().chain(p.scales).any(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            what: "tables or scales",
        });
    }
    let mut bytes = vec![0u8; l.len];
    let mut block = [0u8; BLOCK];
    for r in 0..p.n {
        for b in 0..l.kp / BLOCK {
            for (e, c) in block.iter_mut().enumerate() {
                let kk = b * BLOCK + e;
                *c = if kk < p.k { p.codes[r * p.k + kk] } else { 0 };
            }
            let mut packed = [0u8; BLOCK];
            pack_block(&block, p.bits, &mut packed[..l.block_bytes()]);
            l.write_block(&mut bytes, r, b, &packed);
        }
    }
    for t in 0..l.tables {
        let table: Vec<f32> = p.tables[t * entries..(t + 1) * entries]
            .iter()
            .map(|&v| f16::from_f32(v).to_f32())
            .collect();
        for (i, v) in table.iter().enumerate() {
            let o = l.lut_off + (t * entries + i) * 2;
            bytes[o..o + 2].copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
        }
        if !p.int8_activations {
            continue;
        }
        // The int8 table: exact when the values are small integers (linear levels), else scaled.
        let exact = table.iter().all(|v| v.fract() == 0.0 && v.abs() <= 127.0);
        let amax = table.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = if exact || amax == 0.0 {
            1.0
        } else {
            amax / 127.0
        };
        for (i, v) in table.iter().enumerate() {
            bytes[l.lut_i8_off + t * entries + i] =
                (v / s).round().clamp(-127.0, 127.0) as i8 as u8;
        }
        let o = l.lut_scale_off + t * 4;
        bytes[o..o + 4].copy_from_slice(&s.to_le_bytes());
    }
    for (i, s) in p.scales.iter().enumerate() {
        let o = l.scales_off + i * 2;
        bytes[o..o + 2].copy_from_slice(&f16::from_f32(*s).to_bits().to_le_bytes());
    }
    Ok(Encoded {
        encoding: Encoding::QBlock,
        bytes,
        params,
    })
}

/// The same block-quantized weight with its rows interleaved by tiles of 16
/// ([`QFLAG_ROW_TILES`]): what the runtime's fastest GEMVs of 2-bit affine codes (ternary,
/// int2) and of 4-bit codes with one table per tile stream, with int8 activations. Every other
/// part is unchanged.
///
/// ```
/// # use edgetune_quant::encode::{decode, encode_ternary, row_tiles};
/// # use edgetune_quant::ternary::quantize_ternary;
/// let (n, k) = (20, 64);
/// let w: Vec<f32> = (0..n * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
/// let t = quantize_ternary(&w, n, k, 32, None).unwrap();
/// let rows = encode_ternary(&t, true).unwrap();
/// let tiled = row_tiles(&rows, n, k).unwrap();
/// assert_eq!(decode(&tiled, n, k).unwrap(), decode(&rows, n, k).unwrap());
/// ```
pub fn row_tiles(e: &Encoded, n: usize, k: usize) -> Result<Encoded> {
    let bad = QuantError::Incompatible {
        what: "row tiles apply to a row-major block-quantized weight",
    };
    if e.encoding != Encoding::QBlock || e.params[3] & QFLAG_ROW_TILES != 0 {
        return Err(bad);
    }
    let from = QBlockLayout::new(n, k, e.params).ok_or(bad)?;
    if e.bytes.len() != from.len {
        return Err(QuantError::ShapeMismatch {
            what: "block-quantized bytes",
            expected: from.len,
            got: e.bytes.len(),
        });
    }
    let mut params = e.params;
    params[3] |= QFLAG_ROW_TILES;
    let to = QBlockLayout::new(n, k, params).ok_or(QuantError::Incompatible {
        what: "row-tiled layout parameters",
    })?;
    let mut bytes = vec![0u8; to.len];
    for r in 0..n {
        for b in 0..from.kp / BLOCK {
            to.write_block(&mut bytes, r, b, &from.read_block(&e.bytes, r, b));
        }
        for g in 0..from.groups_per_row() {
            let (src, dst) = (from.scale_offset(r, g), to.scale_offset(r, g));
            bytes[dst..dst + 2].copy_from_slice(&e.bytes[src..src + 2]);
        }
    }
    // Tables (f16, i8, their scales) keep their order; only their offsets move.
    bytes[to.lut_off..to.scales_off].copy_from_slice(&e.bytes[from.lut_off..from.scales_off]);
    Ok(Encoded {
        encoding: Encoding::QBlock,
        bytes,
        params,
    })
}

/// Int8 per output row (codes −127..=127 stored as code + 128 into a linear table).
pub fn encode_int8_rows(q: &Int8Rows, int8_activations: bool) -> Result<Encoded> {
    let codes: Vec<u8> = q.codes.iter().map(|&c| (c as i32 + 128) as u8).collect();
    // Code 0 (−128) never occurs; its entry is clamped to −127 so the table stays exact in i8.
    let table: Vec<f32> = (0..256).map(|c| (c as f32 - 128.0).max(-127.0)).collect();
    encode_qblock(&QBlockParts {
        n: q.n,
        k: q.k,
        bits: 8,
        group: padded_k(q.k),
        rows_per_table: q.n,
        int8_activations,
        codes: &codes,
        tables: &table,
        scales: &q.scales,
    })
}

/// Signed group quantization (`bits` 2..=8) of a matrix whose `k` is already padded to 32s.
pub fn encode_groups(q: &GroupQuant, int8_activations: bool) -> Result<Encoded> {
    if q.k % BLOCK != 0 {
        return Err(QuantError::Incompatible {
            what: "group-quantized rows must be padded to multiples of 32",
        });
    }
    let half_range = 1i32 << (q.bits - 1);
    let codes: Vec<u8> = q
        .codes
        .iter()
        .map(|&c| (c as i32 + half_range) as u8)
        .collect();
    let table: Vec<f32> = (0..1 << q.bits).map(|c| (c - half_range) as f32).collect();
    encode_qblock(&QBlockParts {
        n: q.n,
        k: q.k,
        bits: q.bits as usize,
        group: q.group,
        rows_per_table: q.n,
        int8_activations,
        codes: &codes,
        tables: &table,
        scales: &q.scales,
    })
}

/// Ternary weights (2-bit codes 0, 1, 2 → −1, 0, +1) with per-group scales; `k` padded to 32s.
///
/// The table's unused code 3 continues the line (+2), so the table is affine and the int8
/// kernels multiply the codes themselves (`Σ w·q = Σ c·q − Σ q`) instead of looking them up.
pub fn encode_ternary(t: &Ternary, int8_activations: bool) -> Result<Encoded> {
    if t.k % BLOCK != 0 {
        return Err(QuantError::Incompatible {
            what: "ternary rows must be padded to multiples of 32",
        });
    }
    let codes: Vec<u8> = t.codes.iter().map(|&c| (c + 1) as u8).collect();
    encode_qblock(&QBlockParts {
        n: t.n,
        k: t.k,
        bits: 2,
        group: t.group,
        rows_per_table: t.n,
        int8_activations,
        codes: &codes,
        tables: &[-1.0, 0.0, 1.0, 2.0],
        scales: &t.scales,
    })
}

/// Binary weights (sign bits) with per-group scales; `k` padded to 32s.
pub fn encode_binary(b: &Binary, int8_activations: bool) -> Result<Encoded> {
    if b.k % BLOCK != 0 {
        return Err(QuantError::Incompatible {
            what: "binary rows must be padded to multiples of 32",
        });
    }
    let codes: Vec<u8> = b.signs.iter().map(|&s| (s > 0) as u8).collect();
    encode_qblock(&QBlockParts {
        n: b.n,
        k: b.k,
        bits: 1,
        group: b.group,
        rows_per_table: b.n,
        int8_activations,
        codes: &codes,
        tables: &[-1.0, 1.0],
        scales: &b.scales,
    })
}

/// A codebook: indices into per-tensor, per-row or per-row-group tables; row scales when used.
pub fn encode_codebook(cb: &Codebook, int8_activations: bool) -> Result<Encoded> {
    let kp = padded_k(cb.k);
    // One scale per row, or per group of inputs (a multiple of 32 dividing the padded row, so the
    // layout's groups line up with the codebook's).
    let group = if cb.scale_group >= cb.k {
        kp
    } else {
        cb.scale_group
    };
    if cb.scales.is_some() && (group % 32 != 0 || kp % group != 0) {
        return Err(QuantError::InvalidGroup { group, dim: kp });
    }
    let scales = cb
        .scales
        .clone()
        .unwrap_or_else(|| vec![1.0; cb.n * (kp / group)]);
    encode_qblock(&QBlockParts {
        n: cb.n,
        k: cb.k,
        bits: cb.bits as usize,
        group,
        rows_per_table: cb.rows_per_table,
        int8_activations,
        codes: &cb.indices,
        tables: &cb.centroids,
        scales: &scales,
    })
}

/// N:M sparse weights: `mask` (row-major `n × k`, true = keep) must keep at most `keep` of each
/// `m` consecutive weights; values are stored as f16.
pub fn encode_sparse(
    w: &[f32],
    mask: &[bool],
    n: usize,
    k: usize,
    keep: usize,
    m: usize,
) -> Result<Encoded> {
    let params = [keep as u32, m as u32, 0, 0];
    let l = SparseLayout::new(n, k, params).ok_or(QuantError::InvalidNm { n: keep, m, k })?;
    if w.len() != n * k || mask.len() != n * k {
        return Err(QuantError::ShapeMismatch {
            what: "weights or mask",
            expected: n * k,
            got: w.len(),
        });
    }
    let mut bytes = vec![0u8; l.len];
    let per_row = l.per_row();
    for r in 0..n {
        let mut v = 0;
        for g in 0..k / m {
            let kept: Vec<usize> = (0..m).filter(|&j| mask[r * k + g * m + j]).collect();
            if kept.len() > keep {
                return Err(QuantError::Incompatible {
                    what: "mask keeps more than N of M",
                });
            }
            // Groups with fewer kept weights are filled with explicit zeros at free positions.
            let mut slots: Vec<(usize, f32)> =
                kept.iter().map(|&j| (j, w[r * k + g * m + j])).collect();
            let mut free = (0..m).filter(|j| !kept.contains(j));
            while slots.len() < keep {
                slots.push((free.next().expect("keep <= m"), 0.0));
            }
            for (j, val) in slots {
                let o = (r * per_row + v) * 2;
                bytes[o..o + 2].copy_from_slice(&f16::from_f32(val).to_bits().to_le_bytes());
                let bit = v * l.pos_bits;
                let at = l.pos_off + r * l.pos_row_bytes + bit / 8;
                let word = (j as u16) << (bit % 8);
                bytes[at] |= word as u8;
                if bit % 8 + l.pos_bits > 8 {
                    bytes[at + 1] |= (word >> 8) as u8;
                }
                v += 1;
            }
        }
    }
    Ok(Encoded {
        encoding: Encoding::SparseNM,
        bytes,
        params,
    })
}

/// f16 values in 16-wide GEMM panels.
pub fn encode_panel_f16(w: &[f32], n: usize, k: usize) -> Encoded {
    let panel = edgetune_core::PANEL;
    let panels = n.div_ceil(panel);
    let mut bytes = Vec::with_capacity(panels * k * panel * 2);
    for p in 0..panels {
        for kk in 0..k {
            for j in 0..panel {
                let r = p * panel + j;
                let v = if r < n { w[r * k + kk] } else { 0.0 };
                bytes.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
            }
        }
    }
    Encoded {
        encoding: Encoding::PanelF16,
        bytes,
        params: [0; 4],
    }
}

fn f16_at(bytes: &[u8], o: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[o], bytes[o + 1]])).to_f32()
}

/// The `n × k` f32 values an encoded weight stands for (host-side checks and reports only).
pub fn decode(e: &Encoded, n: usize, k: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; n * k];
    match e.encoding {
        Encoding::QBlock => {
            let l = QBlockLayout::new(n, k, e.params).ok_or(QuantError::Incompatible {
                what: "block-quantized layout",
            })?;
            for r in 0..n {
                let t = r / l.rows_per_table;
                for kk in 0..k {
                    let (b, el) = (kk / BLOCK, kk % BLOCK);
                    let block = l.read_block(&e.bytes, r, b);
                    let code = edgetune_core::layout::block_code(&block, l.bits, el) as usize;
                    let v = f16_at(&e.bytes, l.lut_off + (t * l.entries() + code) * 2);
                    let s = f16_at(&e.bytes, l.scale_offset(r, kk / l.group));
                    out[r * k + kk] = v * s;
                }
            }
        }
        Encoding::SparseNM => {
            let l = SparseLayout::new(n, k, e.params).ok_or(QuantError::Incompatible {
                what: "sparse layout",
            })?;
            let per_row = l.per_row();
            for r in 0..n {
                let pos = &e.bytes
                    [l.pos_off + r * l.pos_row_bytes..l.pos_off + (r + 1) * l.pos_row_bytes];
                for v in 0..per_row {
                    let col = v / l.keep * l.m + l.position(pos, v);
                    out[r * k + col] += f16_at(&e.bytes, (r * per_row + v) * 2);
                }
            }
        }
        Encoding::PanelF16 => {
            let panel = edgetune_core::PANEL;
            for r in 0..n {
                for kk in 0..k {
                    out[r * k + kk] =
                        f16_at(&e.bytes, ((r / panel * k + kk) * panel + r % panel) * 2);
                }
            }
        }
        Encoding::PanelF32 | Encoding::Plain => {
            return Err(QuantError::Incompatible {
                what: "not a compressed encoding",
            })
        }
    }
    Ok(out)
}

/// Bits per weight of an encoded `n × k` matrix, tables and scales included.
pub fn bits_per_weight(e: &Encoded, n: usize, k: usize) -> f64 {
    8.0 * e.bytes.len() as f64 / (n * k) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmeans::{
        codebook_quantize, codebook_quantize_with, Codebook, CodebookOptions, Granularity,
    };
    use crate::rng::SplitMix64;
    use crate::scalar::quantize_int8_rows;

    #[test]
    fn codebook_round_trips_through_the_layout() {
        let (n, k) = (5, 70);
        let w = SplitMix64::new(3).gaussian_vec(n * k);
        let cb = codebook_quantize(&w, n, k, 3, Granularity::PerRow, None).unwrap();
        let e = encode_codebook(&cb, false).unwrap();
        let back = decode(&e, n, k).unwrap();
        // Decoding gives the codebook's own values up to the f16 rounding of the table.
        for (a, b) in back.iter().zip(cb.dequantize()) {
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1e-3), "{a} vs {b}");
        }
        // Size: 3-bit codes plus, per row, an 8-entry f16 table, its i8 copy, its f32 scale and
        // an f16 row scale (30 bytes), plus alignment padding of the parts; without the int8
        // flag the i8 copy and its scale are left out (18 bytes).
        let (n2, k2) = (64, 256);
        let w2 = SplitMix64::new(4).gaussian_vec(n2 * k2);
        let cb2 = codebook_quantize(&w2, n2, k2, 3, Granularity::PerRow, None).unwrap();
        let e2 = encode_codebook(&cb2, true).unwrap();
        let expect = n2 * k2 * 3 / 8 + n2 * 30;
        assert!(
            e2.bytes.len() >= expect && e2.bytes.len() <= expect + 64,
            "{}",
            e2.bytes.len()
        );
        let e3 = encode_codebook(&cb2, false).unwrap();
        assert_eq!(e2.bytes.len() - e3.bytes.len(), n2 * 12);
    }

    #[test]
    fn row_tiles_keep_every_weight_of_any_width() {
        // Words of 16 rows interleaved (3 and 4 bits), whole blocks (1 and 2 bits); rows that
        // end inside a tile, a ragged k.
        for (bits, n, k) in [(4, 37, 70), (3, 20, 64), (2, 17, 96), (1, 16, 33)] {
            let w = SplitMix64::new(bits as u64).gaussian_vec(n * k);
            let gran = Granularity::PerGroupOfRows(16);
            let cb = codebook_quantize(&w, n, k, bits, gran, None).unwrap();
            let rows = encode_codebook(&cb, true).unwrap();
            let tiled = row_tiles(&rows, n, k).unwrap();
            assert_eq!(tiled.params[3], rows.params[3] | QFLAG_ROW_TILES);
            assert_eq!(decode(&tiled, n, k).unwrap(), decode(&rows, n, k).unwrap());
            assert!(row_tiles(&tiled, n, k).is_err(), "tiled twice");
        }
    }

    #[test]
    fn group_scaled_codebooks_round_trip_and_fit_rows_that_change_scale() {
        // Rows whose first 64 inputs are 20x larger than the rest: a scale per 32 inputs lets one
        // shared table serve both parts; one scale per row cannot.
        let (n, k) = (16, 128);
        let mut rng = SplitMix64::new(9);
        let w: Vec<f32> = (0..n * k)
            .map(|i| rng.gaussian_vec(1)[0] * if i % k < 64 { 20.0 } else { 1.0 })
            .collect();
        let mut opts = CodebookOptions::new(4, Granularity::PerGroupOfRows(8), None);
        let row = codebook_quantize_with(&w, n, k, &opts).unwrap();
        opts.scale_group = Some(32);
        let grouped = codebook_quantize_with(&w, n, k, &opts).unwrap();
        assert_eq!(grouped.scales.as_ref().map(Vec::len), Some(n * 4));
        let err =
            |cb: &Codebook| crate::metrics::rel_frobenius_error(&w[..], &cb.dequantize()).unwrap();
        let tail = |cb: &Codebook| {
            let d = cb.dequantize();
            (0..n * k)
                .filter(|i| i % k >= 64)
                .map(|i| (w[i] - d[i]).powi(2) as f64)
                .sum::<f64>()
        };
        assert!(
            tail(&grouped) < 0.1 * tail(&row),
            "small part: {} vs {}",
            tail(&grouped),
            tail(&row)
        );
        assert!(err(&grouped) <= err(&row) * 1.05);
        let e = encode_codebook(&grouped, false).unwrap();
        assert_eq!(e.params[1], 32, "one layout scale per 32 inputs");
        for (a, b) in decode(&e, n, k).unwrap().iter().zip(grouped.dequantize()) {
            assert!((a - b).abs() <= 2e-3 * b.abs().max(1e-2), "{a} vs {b}");
        }
        // A scale group the layout cannot hold (not a multiple of 32) is an error, not a guess.
        opts.scale_group = Some(48);
        let odd = codebook_quantize_with(&w, n, k, &opts).unwrap();
        assert!(encode_codebook(&odd, false).is_err());
    }

    #[test]
    fn int8_rows_are_exact_in_the_int8_table() {
        let (n, k) = (3, 40);
        let w = SplitMix64::new(5).gaussian_vec(n * k);
        let q = quantize_int8_rows(&w, n, k).unwrap();
        let e = encode_int8_rows(&q, true).unwrap();
        let l = QBlockLayout::new(n, k, e.params).unwrap();
        // Linear levels are small integers: the int8 table is the levels themselves, scale 1.
        assert_eq!(
            &e.bytes[l.lut_scale_off..l.lut_scale_off + 4],
            &1.0f32.to_le_bytes()
        );
        assert_eq!(e.bytes[l.lut_i8_off + 128 + 5] as i8, 5);
        let back = decode(&e, n, k).unwrap();
        for (a, b) in back.iter().zip(q.dequantize()) {
            assert!((a - b).abs() <= 1e-6 + 1e-3 * b.abs());
        }
    }

    #[test]
    fn sparse_round_trips_and_rejects_dense_groups() {
        let (n, k) = (2, 8);
        let w: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        let mask: Vec<bool> = (0..16).map(|i| i % 4 == 1 || i % 4 == 3).collect();
        let e = encode_sparse(&w, &mask, n, k, 2, 4).unwrap();
        let back = decode(&e, n, k).unwrap();
        for i in 0..16 {
            assert_eq!(back[i], if mask[i] { w[i] } else { 0.0 });
        }
        let dense = vec![true; 16];
        assert!(encode_sparse(&w, &dense, n, k, 2, 4).is_err());
        assert!(encode_sparse(&w, &mask, n, 6, 2, 4).is_err());
    }
}
