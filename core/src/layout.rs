//! Byte layouts of the compressed weight encodings, shared by the encoder (host) and the kernels
//! (device). A weight is a logical matrix `[N, K]`: one row per output channel, `K` inputs.
//!
//! # Block-quantized (`Encoding::QBlock`)
//!
//! `w[n][k] = scale[n][k / G] · lut[n / R][code[n][k]]`, with `b`-bit codes (1–8). One layout
//! serves int8 per channel (b = 8, G = K), int4 groups (b = 4, G = 32/64/128, levels −8..7),
//! ternary (b = 2, levels −1, 0, 1; code 3, never written, is +2), binary (b = 1, levels −1, 1) and codebooks (any b, one table
//! of centroids per tensor, per `R` rows, or per row).
//!
//! Rows are padded to `Kp = ⌈K/32⌉·32` with code 0 (the kernels pad activations with zeros).
//! Each block of 32 codes takes `4b` bytes as planes of 8, 4, 2 and 1 bits (the binary digits of
//! `b`, largest first; each plane holds the next bits of the code, lowest first). In a `p`-bit
//! plane of `4p` bytes, element `e` sits in byte `e mod 4p` at bit `p · ⌊e / 4p⌋` — for 4 bits
//! exactly llama.cpp's Q4_0 nibble order (low nibbles are elements 0–15).
//!
//! The blob holds, each part starting at a multiple of 16 bytes:
//! 1. codes: `N` rows of `Kp/32` blocks;
//! 2. `lut`: `T = ⌈N/R⌉` tables of `2^b` f16 values (the trainable centroids/levels);
//! 3. `lut_i8`: the same tables rounded to i8 with a per-table f32 `lut_scale` (4. below), used by
//!    kernels that multiply with int8-quantized activations — present only when the int8 flag is
//!    set (empty otherwise);
//! 4. `lut_scale`: `T` f32 (present with `lut_i8`);
//! 5. `scales`: `N × Kp/G` f16.
//!
//! Parameters: `[b, G, R, flags]`; flag bit 0 asks kernels to quantize activations to int8 per
//! block of 32 (llama.cpp's Q8_0) and use integer dot products.
//!
//! Flag bit 1 ([`QFLAG_ROW_TILES`]) interleaves rows by tiles of [`ROW_TILE`] (16): rows are
//! padded to `Np = ⌈N/16⌉·16` (padding rows: code 0, scale 0), tile `t` holds, for each block
//! `b` in order, the 16 rows' blocks `b`, and the scales hold, for each tile and each group,
//! the 16 rows' scales. For 1- and 2-bit codes the 16 blocks follow one another; wider blocks
//! are interleaved by 4-byte words (word 0 of the 16 rows, then word 1, …). A GEMV then streams
//! one tile as 16 rows side by side: one 64-byte register is a block of 8 rows (2-bit codes) or
//! one word of 16 rows (4-bit codes: inputs 4w..4w + 4 and 16 + 4w.. of each row, one lane per
//! row), and every step serves 16 outputs (the kernels in `edgetune-runtime`'s `qgemm`).
//!
//! # Sparse N:M (`Encoding::SparseNM`)
//!
//! In every group of `M` consecutive inputs at most `N` weights are non-zero. Per row: the kept
//! values (`K/M · N` f16), then their positions inside the group as `⌈log2 M⌉`-bit fields packed
//! lowest bit first, each row's positions starting on a byte. Parameters `[N, M, 0, 0]`, `K` a
//! multiple of `M`, `M` in 2..=16.

use crate::tensor::PANEL;

/// Codes per block.
pub const BLOCK: usize = 32;

/// Flag in a block-quantized tensor's parameters: multiply with int8-quantized activations.
pub const QFLAG_INT8_ACTIVATIONS: u32 = 1;

/// Flag in a block-quantized tensor's parameters: blocks and scales interleaved by tiles of
/// [`ROW_TILE`] rows.
pub const QFLAG_ROW_TILES: u32 = 2;

/// Rows per tile of a [`QFLAG_ROW_TILES`] layout.
pub const ROW_TILE: usize = 16;

fn align16(v: usize) -> usize {
    v.div_ceil(16) * 16
}

/// Where each part of a block-quantized weight lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QBlockLayout {
    /// Rows (outputs).
    pub n: usize,
    /// Columns (inputs).
    pub k: usize,
    /// `k` padded to a multiple of 32.
    pub kp: usize,
    /// Bits per code.
    pub bits: usize,
    /// Weights per scale along `k` (a multiple of 32 dividing `kp`).
    pub group: usize,
    /// Rows sharing one table.
    pub rows_per_table: usize,
    /// Number of tables.
    pub tables: usize,
    /// Flags ([`QFLAG_INT8_ACTIVATIONS`]).
    pub flags: u32,
    /// Byte offset of the f16 tables.
    pub lut_off: usize,
    /// Byte offset of the i8 tables.
    pub lut_i8_off: usize,
    /// Byte offset of the f32 per-table scales of the i8 tables.
    pub lut_scale_off: usize,
    /// Byte offset of the f16 group scales.
    pub scales_off: usize,
    /// Total bytes.
    pub len: usize,
}

impl QBlockLayout {
    /// The layout for `[n, k]` with parameters `[bits, group, rows_per_table, flags]`, or `None`
    /// when the parameters are invalid or the size overflows.
    pub fn new(n: usize, k: usize, params: [u32; 4]) -> Option<QBlockLayout> {
        let [bits, group, rpt, flags] = params.map(|p| p as usize);
        let known = QFLAG_INT8_ACTIVATIONS | QFLAG_ROW_TILES;
        if !(1..=8).contains(&bits) || n == 0 || k == 0 || rpt == 0 || flags & !known as usize != 0
        {
            return None;
        }
        let kp = k.checked_add(BLOCK - 1)? / BLOCK * BLOCK;
        if group == 0 || group % BLOCK != 0 || kp % group != 0 {
            return None;
        }
        let tables = n.div_ceil(rpt);
        let entries = 1usize << bits;
        let stored = if flags as u32 & QFLAG_ROW_TILES != 0 {
            n.checked_add(ROW_TILE - 1)? / ROW_TILE * ROW_TILE
        } else {
            n
        };
        let codes = stored.checked_mul(kp / BLOCK)?.checked_mul(4 * bits)?;
        let lut_off = align16(codes);
        let int8 = flags as u32 & QFLAG_INT8_ACTIVATIONS != 0;
        let lut_i8_off = align16(lut_off.checked_add(tables.checked_mul(entries * 2)?)?);
        let lut_scale_off = align16(lut_i8_off + if int8 { tables * entries } else { 0 });
        let scales_off = align16(lut_scale_off + if int8 { tables * 4 } else { 0 });
        let len = scales_off.checked_add(stored.checked_mul(kp / group)?.checked_mul(2)?)?;
        Some(QBlockLayout {
            n,
            k,
            kp,
            bits,
            group,
            rows_per_table: rpt,
            tables,
            flags: flags as u32,
            lut_off,
            lut_i8_off,
            lut_scale_off,
            scales_off,
            len,
        })
    }

    /// Bytes of one row's codes.
    pub fn row_bytes(&self) -> usize {
        self.kp / BLOCK * 4 * self.bits
    }

    /// Bytes of one block's codes.
    pub fn block_bytes(&self) -> usize {
        4 * self.bits
    }

    /// Entries per table.
    pub fn entries(&self) -> usize {
        1 << self.bits
    }

    /// Scales per row.
    pub fn groups_per_row(&self) -> usize {
        self.kp / self.group
    }

    /// True when kernels multiply with int8-quantized activations.
    pub fn int8_activations(&self) -> bool {
        self.flags & QFLAG_INT8_ACTIVATIONS != 0
    }

    /// True when rows are interleaved by tiles of [`ROW_TILE`].
    pub fn row_tiles(&self) -> bool {
        self.flags & QFLAG_ROW_TILES != 0
    }

    /// True when the rows of every [`ROW_TILE`] share one table (one table in all, or one per a
    /// multiple of 16 rows): what row-tiled kernels with tables need.
    pub fn one_table_per_tile(&self) -> bool {
        self.rows_per_table >= self.n || self.rows_per_table.is_multiple_of(ROW_TILE)
    }

    /// The table of tile `tile`'s rows, when [`one_table_per_tile`](Self::one_table_per_tile).
    pub fn tile_table(&self, tile: usize) -> usize {
        if self.rows_per_table >= self.n {
            0
        } else {
            tile * ROW_TILE / self.rows_per_table
        }
    }

    /// Rows stored: `n`, or `n` rounded up to whole tiles.
    pub fn stored_rows(&self) -> usize {
        if self.row_tiles() {
            self.n.div_ceil(ROW_TILE) * ROW_TILE
        } else {
            self.n
        }
    }

    /// Bytes of a row's block kept together inside a row tile: the whole block for 1- and 2-bit
    /// codes, one 4-byte word for wider ones (see the module documentation).
    pub fn tile_chunk(&self) -> usize {
        if self.bits <= 2 {
            self.block_bytes()
        } else {
            4
        }
    }

    /// Byte offset of byte `i` of block `b` of row `n`'s codes.
    ///
    /// ```
    /// # use edgetune_core::layout::{QBlockLayout, QFLAG_ROW_TILES};
    /// // 2-bit codes (8 bytes a block), 40 rows of 64 inputs, tiled: row 17 is the second row
    /// // of the second tile, whose blocks 0 come first.
    /// let l = QBlockLayout::new(40, 64, [2, 64, 1, QFLAG_ROW_TILES]).unwrap();
    /// assert_eq!(l.code_offset(17, 1, 0), (2 * 16 + 16 + 1) * 8);
    /// // 4-bit codes (16 bytes a block): words 0 of the tile's 16 rows, then words 1, …
    /// let l = QBlockLayout::new(40, 64, [4, 64, 1, QFLAG_ROW_TILES]).unwrap();
    /// assert_eq!(l.code_offset(17, 1, 5), (2 * 16 + 16) * 16 + 16 * 4 + 4 + 1);
    /// ```
    pub fn code_offset(&self, n: usize, b: usize, i: usize) -> usize {
        let bb = self.block_bytes();
        if self.row_tiles() {
            let nb = self.kp / BLOCK;
            let c = self.tile_chunk();
            (n / ROW_TILE * nb + b) * ROW_TILE * bb
                + i / c * ROW_TILE * c
                + n % ROW_TILE * c
                + i % c
        } else {
            n * self.row_bytes() + b * bb + i
        }
    }

    /// The bytes of block `b` of row `n` (the first [`block_bytes`](Self::block_bytes) of the
    /// result), gathered from a tile when rows are tiled.
    pub fn read_block(&self, bytes: &[u8], n: usize, b: usize) -> [u8; 4 * 8] {
        let mut out = [0u8; 4 * 8];
        let bb = self.block_bytes();
        if !self.row_tiles() || self.tile_chunk() == bb {
            let at = self.code_offset(n, b, 0);
            out[..bb].copy_from_slice(&bytes[at..at + bb]);
        } else {
            for (i, o) in out.iter_mut().enumerate().take(bb) {
                *o = bytes[self.code_offset(n, b, i)];
            }
        }
        out
    }

    /// Writes block `b` of row `n` (`block`: its [`block_bytes`](Self::block_bytes) bytes).
    pub fn write_block(&self, bytes: &mut [u8], n: usize, b: usize, block: &[u8]) {
        for (i, v) in block.iter().enumerate().take(self.block_bytes()) {
            bytes[self.code_offset(n, b, i)] = *v;
        }
    }

    /// Byte offset of the f16 scale of row `n`, group `g`.
    pub fn scale_offset(&self, n: usize, g: usize) -> usize {
        let gpr = self.groups_per_row();
        self.scales_off
            + 2 * if self.row_tiles() {
                (n / ROW_TILE * gpr + g) * ROW_TILE + n % ROW_TILE
            } else {
                n * gpr + g
            }
    }
}

/// The plane widths of `bits`-bit codes, largest first (8 → `[8]`; 7 → `[4, 2, 1]`).
pub fn planes(bits: usize) -> impl Iterator<Item = usize> {
    [8usize, 4, 2, 1]
        .into_iter()
        .filter(move |&p| bits & p != 0)
}

/// Code of element `e` (0..32) of one block's bytes.
#[inline]
pub fn block_code(block: &[u8], bits: usize, e: usize) -> u8 {
    let mut code = 0u32;
    let mut shift = 0;
    let mut at = 0;
    for p in planes(bits) {
        let bytes = 4 * p;
        let byte = block[at + e % bytes];
        let v = (byte >> (p * (e / bytes))) as u32 & ((1u32 << p) - 1);
        code |= v << shift;
        shift += p;
        at += bytes;
    }
    code as u8
}

/// Writes the codes of one block (`codes.len()` = 32) into `out` (4·bits bytes).
pub fn pack_block(codes: &[u8], bits: usize, out: &mut [u8]) {
    out.iter_mut().for_each(|b| *b = 0);
    let mut shift = 0;
    let mut at = 0;
    for p in planes(bits) {
        let bytes = 4 * p;
        for (e, &c) in codes.iter().enumerate() {
            let v = ((c as u32 >> shift) & ((1u32 << p) - 1)) as u8;
            out[at + e % bytes] |= v << (p * (e / bytes));
        }
        shift += p;
        at += bytes;
    }
}

/// Where each part of an N:M sparse weight lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseLayout {
    /// Rows.
    pub n: usize,
    /// Columns.
    pub k: usize,
    /// Kept weights per group.
    pub keep: usize,
    /// Group size.
    pub m: usize,
    /// Bits per position.
    pub pos_bits: usize,
    /// Byte offset of the positions.
    pub pos_off: usize,
    /// Position bytes per row.
    pub pos_row_bytes: usize,
    /// Total bytes.
    pub len: usize,
}

impl SparseLayout {
    /// The layout for `[n, k]` with parameters `[keep, m, 0, 0]`.
    pub fn new(n: usize, k: usize, params: [u32; 4]) -> Option<SparseLayout> {
        let [keep, m, z0, z1] = params.map(|p| p as usize);
        if !(2..=16).contains(&m)
            || keep == 0
            || keep > m
            || k % m != 0
            || n == 0
            || z0 != 0
            || z1 != 0
        {
            return None;
        }
        let pos_bits = (usize::BITS - (m - 1).leading_zeros()) as usize;
        let per_row = (k / m).checked_mul(keep)?;
        let values = n.checked_mul(per_row)?.checked_mul(2)?;
        let pos_off = align16(values);
        let pos_row_bytes = per_row.checked_mul(pos_bits)?.div_ceil(8);
        let len = pos_off.checked_add(n.checked_mul(pos_row_bytes)?)?;
        Some(SparseLayout {
            n,
            k,
            keep,
            m,
            pos_bits,
            pos_off,
            pos_row_bytes,
            len,
        })
    }

    /// Kept values per row.
    pub fn per_row(&self) -> usize {
        self.k / self.m * self.keep
    }

    /// Position of kept value `i` of a row, from the row's position bytes.
    #[inline]
    pub fn position(&self, row: &[u8], i: usize) -> usize {
        let bit = i * self.pos_bits;
        let word = row[bit / 8] as u32 | (row.get(bit / 8 + 1).copied().unwrap_or(0) as u32) << 8;
        ((word >> (bit % 8)) & ((1 << self.pos_bits) - 1)) as usize
    }
}

/// Bytes of an f16 panel-packed `[n, k]` matrix.
pub fn panel_f16_len(n: usize, k: usize) -> Option<usize> {
    n.div_ceil(PANEL).checked_mul(k)?.checked_mul(PANEL * 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn four_bit_blocks_follow_q4_0_order() {
        let codes: [u8; 32] = core::array::from_fn(|i| (i % 16) as u8);
        let mut b = [0u8; 16];
        pack_block(&codes, 4, &mut b);
        // Byte i holds element i (low nibble) and element i + 16 (high nibble).
        assert_eq!(b[3], 3 | (3 << 4));
        for e in 0..32 {
            assert_eq!(block_code(&b, 4, e), codes[e]);
        }
    }

    #[test]
    fn every_width_round_trips() {
        for bits in 1..=8 {
            let codes: [u8; 32] = core::array::from_fn(|i| ((i * 37 + 11) % (1 << bits)) as u8);
            let mut b = [0u8; 32];
            pack_block(&codes, bits, &mut b[..4 * bits]);
            for e in 0..32 {
                assert_eq!(
                    block_code(&b[..4 * bits], bits, e),
                    codes[e],
                    "bits {bits} element {e}"
                );
            }
        }
    }

    #[test]
    fn layouts_reject_bad_parameters() {
        assert!(QBlockLayout::new(4, 64, [9, 32, 1, 0]).is_none());
        assert!(QBlockLayout::new(4, 64, [4, 48, 1, 0]).is_none());
        assert!(QBlockLayout::new(4, 64, [4, 32, 0, 0]).is_none());
        assert!(QBlockLayout::new(4, 64, [4, 32, 1, 4]).is_none());
        let l = QBlockLayout::new(3, 70, [4, 32, 3, 1]).unwrap();
        assert_eq!((l.kp, l.tables, l.row_bytes()), (96, 1, 48));
        assert!(SparseLayout::new(4, 6, [2, 4, 0, 0]).is_none());
        let s = SparseLayout::new(2, 8, [2, 4, 0, 0]).unwrap();
        assert_eq!((s.pos_bits, s.per_row(), s.pos_row_bytes), (2, 4, 1));
    }

    #[test]
    fn row_tiles_place_every_block_and_scale_once_inside_the_padded_parts() {
        for (n, k, bits) in [
            (1, 32, 2),
            (17, 96, 2),
            (40, 70, 4),
            (16, 64, 1),
            (20, 64, 3),
        ] {
            let l = QBlockLayout::new(n, k, [bits, 32, 1, QFLAG_ROW_TILES]).unwrap();
            let np = n.div_ceil(ROW_TILE) * ROW_TILE;
            let nb = l.kp / BLOCK;
            let bb = l.block_bytes();
            let mut blocks: Vec<usize> = (0..np)
                .flat_map(|r| (0..nb * bb).map(move |i| (r, i / bb, i % bb)))
                .map(|(r, b, i)| l.code_offset(r, b, i))
                .collect();
            blocks.sort_unstable();
            let expect: Vec<usize> = (0..np * nb * bb).collect();
            assert_eq!(blocks, expect, "n {n} k {k} bits {bits}");
            let gpr = l.groups_per_row();
            let mut scales: Vec<usize> = (0..np)
                .flat_map(|r| (0..gpr).map(move |g| (r, g)))
                .map(|(r, g)| l.scale_offset(r, g))
                .collect();
            scales.sort_unstable();
            let expect: Vec<usize> = (0..np * gpr).map(|i| l.scales_off + 2 * i).collect();
            assert_eq!(scales, expect);
            assert_eq!(l.len, l.scales_off + np * gpr * 2);
            assert!(np * l.row_bytes() <= l.lut_off);
        }
    }
}
