//! The matrix multiply behind [`super::matmul`]: C (+)= A·B.
//!
//! A BLIS-style blocked GEMM. B is packed into panels of `NR` columns
//! (zero-padded at the edge), then a register-tiled micro-kernel computes
//! each `MR × NR` tile of C as a sum over a block of `KC` depth. A is not
//! packed: the micro-kernel broadcasts its elements one at a time, and a
//! scalar load costs the same from any stride.
//!
//! ```text
//! for each block of NC columns (jc), each block of KC depth (pc):
//!     pack B[pc.., jc..]                      → panels [n/NR][KC][NR]
//!     for each NR panel (jr), each MR rows (ir):
//!         C[ir.., jr..] (+)= A[ir.., pc..] · B_panel
//! ```
//!
//! The packing buffer is thread-local and allocated once, at its largest
//! size, on a thread's first multiply; afterwards no call allocates.
//!
//! Two micro-kernels compute the same tile: an AVX-512 one with explicit
//! intrinsics (used when the CPU has AVX-512F; specialised for tiles of 1 to
//! 8 real rows), and a portable one in plain Rust (the fallback, and the
//! reference the tests compare against).
//!
//! The weights of a model that is only being run (not trained) are packed
//! once ([`pack_weight`]) and multiplied from their panels
//! ([`gemm_prepacked`]): the same tiles in the same order, so the same result
//! to the bit, without re-packing on every product.

use std::cell::RefCell;

use super::{Mat, MatMut};

/// Rows of C per micro-kernel tile.
pub(super) const MR: usize = 8;
/// Columns of C per micro-kernel tile (two 16-lane AVX-512 registers).
pub(super) const NR: usize = 32;
/// Depth of one packed block: a `KC × NR` B panel is 32 KB.
const KC: usize = 256;
/// Columns of one packed B block (`KC × NC` floats = 256 KB, in L2).
const NC: usize = 512;

thread_local! {
    /// Packed B for this thread, sized for the largest block.
    static PACKED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Which micro-kernel computes the tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX-512F intrinsics.
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub(super) fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Kernel::Avx512;
        }
        Kernel::Portable
    }
}

/// C (+)= A·B with shapes already checked by the caller (m, n, k > 0).
pub(super) fn gemm(mut c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool, kernel: Kernel) {
    let (n, k) = (c.cols, a.cols);
    PACKED_B.with_borrow_mut(|packed_b| {
        if packed_b.is_empty() {
            packed_b.resize(NC * KC, 0.0);
        }
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                pack_b(packed_b, b, pc, kc, jc, nc, kernel);
                let block = Block { jc, nc, pc, kc };
                multiply_block(&mut c, a, packed_b, block, accumulate, kernel);
            }
        }
    });
}

/// Length of B = Wᵀ (W [n, k] row-major) packed by [`pack_weight`]:
/// every depth block holds all ⌈n/NR⌉ panels.
pub(super) fn packed_len(n: usize, k: usize) -> usize {
    n.div_ceil(NR) * NR * k
}

/// Packs B = Wᵀ once, in the exact panels [`gemm`] would build on every call:
/// for each depth block pc, panel q holds kc rows of NR values.
pub(super) fn pack_weight(packed: &mut [f32], b: Mat<'_>, kernel: Kernel) {
    let (k, n) = (b.rows, b.cols);
    let n_pad = n.div_ceil(NR) * NR;
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        pack_b(
            &mut packed[pc * n_pad..pc * n_pad + kc * n_pad],
            b,
            pc,
            kc,
            0,
            n,
            kernel,
        );
    }
}

/// C (+)= A·B with B already packed by [`pack_weight`]: the same tiles, in
/// the same order, as [`gemm`] — so the same result to the bit.
pub(super) fn gemm_prepacked(
    mut c: MatMut<'_>,
    a: Mat<'_>,
    packed: &[f32],
    accumulate: bool,
    kernel: Kernel,
) {
    let (n, k) = (c.cols, a.cols);
    let n_pad = n.div_ceil(NR) * NR;
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let start = pc * n_pad + jc * kc;
            let panels = &packed[start..start + nc.div_ceil(NR) * NR * kc];
            multiply_block(
                &mut c,
                a,
                panels,
                Block { jc, nc, pc, kc },
                accumulate,
                kernel,
            );
        }
    }
}

/// A block of the product: columns jc..jc+nc of C, depth pc..pc+kc.
#[derive(Debug, Clone, Copy)]
struct Block {
    jc: usize,
    nc: usize,
    pc: usize,
    kc: usize,
}

/// Every tile of one block: C[:, jc..jc+nc] (+)= A[:, pc..pc+kc] · panels.
fn multiply_block(
    c: &mut MatMut<'_>,
    a: Mat<'_>,
    panels: &[f32],
    block: Block,
    accumulate: bool,
    kernel: Kernel,
) {
    let Block { jc, nc, pc, kc } = block;
    let m = c.rows;
    // Only the first depth block may overwrite; later ones add.
    let add = accumulate || pc > 0;
    for jr in (0..nc).step_by(NR) {
        let pb = &panels[jr * kc..(jr + NR) * kc];
        for ir in (0..m).step_by(MR) {
            let tile = Tile {
                row: ir,
                col: jc + jr,
                rows: MR.min(m - ir),
                cols: NR.min(nc - jr),
                depth: pc,
            };
            match kernel {
                Kernel::Portable => tile_portable(c.data, c.row_stride, tile, kc, a, pb, add),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => {
                    assert!(tile.fits(c.rows, c.cols, a, kc));
                    // SAFETY: the CPU has AVX-512F (Kernel::best checked it);
                    // `pb` holds kc·NR floats; the tile's rows and columns lie
                    // inside C and its rows and depth inside A (asserted just
                    // above; both views were bounds-checked on construction),
                    // and only those elements are read or written.
                    unsafe {
                        let c_ptr = c.data.as_mut_ptr();
                        tile_avx512(c_ptr, c.row_stride, tile, kc, a, pb, add)
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                Kernel::Avx512 => unreachable!("AVX-512 exists only on x86_64"),
            }
        }
    }
}

/// One `MR × NR` tile of C: its top-left corner and how much of it is real.
#[derive(Debug, Clone, Copy)]
struct Tile {
    /// First row of C (and of A).
    row: usize,
    /// First column of C.
    col: usize,
    /// Real rows, ≤ MR.
    rows: usize,
    /// Real columns, ≤ NR.
    cols: usize,
    /// First column of A (the depth block's start).
    depth: usize,
}

impl Tile {
    /// True when the tile lies inside C [rows, cols] and its A rows over `kc` depth inside `a`.
    fn fits(&self, rows: usize, cols: usize, a: Mat<'_>, kc: usize) -> bool {
        (1..=MR).contains(&self.rows)
            && self.cols <= NR
            && self.row + self.rows <= rows
            && self.col + self.cols <= cols
            && self.row + self.rows <= a.rows
            && self.depth + kc <= a.cols
    }
}

/// Packs B[pc..pc+kc, jc..jc+nc] into panels of NR columns: panel q holds, for
/// each depth p, the NR values B[pc+p, jc+q·NR ..], zero past column nc.
fn pack_b(out: &mut [f32], b: Mat<'_>, pc: usize, kc: usize, jc: usize, nc: usize, kernel: Kernel) {
    for (q, panel) in out[..nc.div_ceil(NR) * NR * kc]
        .chunks_exact_mut(NR * kc)
        .enumerate()
    {
        let j0 = jc + q * NR;
        let width = NR.min(jc + nc - j0);
        if b.col_stride == 1 {
            // Rows of B are contiguous: copy NR-wide row pieces.
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                let start = (pc + p) * b.row_stride + j0;
                dst[..width].copy_from_slice(&b.data[start..start + width]);
                dst[width..].fill(0.0);
            }
            continue;
        }
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 if b.row_stride == 1 => {
                assert!((j0 + width - 1) * b.col_stride + pc + kc <= b.data.len());
                // SAFETY: the CPU has AVX-512F; B's columns j0..j0+width are
                // contiguous over depth pc..pc+kc inside `b.data` (asserted above),
                // and `panel` holds kc·NR floats.
                unsafe { pack_b_columns_avx512(panel, b, pc, kc, j0, width) }
            }
            _ => {
                // Columns of B are contiguous (B = Wᵀ): walk each column down the depth.
                if width < NR {
                    panel.fill(0.0);
                }
                for j in 0..width {
                    let col = &b.data[(j0 + j) * b.col_stride..];
                    for p in 0..kc {
                        panel[p * NR + j] = col[(pc + p) * b.row_stride];
                    }
                }
            }
        }
    }
}

/// Packs one NR-column panel of a B whose columns are contiguous (B = Wᵀ with
/// W row-major), by 16 × 16 register transposes: 16 rows of W (16 depths each)
/// become 16 panel rows of 16 columns.
///
/// # Safety
/// The CPU must support AVX-512F; `b.row_stride == 1`; for every j < width,
/// `b.data[(j0 + j)·col_stride + pc .. + kc]` must be in bounds; `panel` must
/// hold `kc·NR` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_columns_avx512(
    panel: &mut [f32],
    b: Mat<'_>,
    pc: usize,
    kc: usize,
    j0: usize,
    width: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(panel.len() >= kc * NR && b.row_stride == 1);
    for half in 0..NR / 16 {
        for p0 in (0..kc).step_by(16) {
            let depth = (kc - p0).min(16);
            let depth_mask = ((1u32 << depth) - 1) as __mmask16;
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, row) in r.iter_mut().enumerate() {
                let j = half * 16 + i;
                if j < width {
                    // SAFETY: column j0 + j exists and depths pc+p0 .. pc+p0+depth
                    // are in bounds (caller's contract); masked-off lanes are not read.
                    *row = unsafe {
                        _mm512_maskz_loadu_ps(
                            depth_mask,
                            b.data.as_ptr().add((j0 + j) * b.col_stride + pc + p0),
                        )
                    };
                }
            }
            let t = transpose16(r);
            for (i, v) in t.iter().enumerate().take(depth) {
                // SAFETY: (p0 + i) < kc, so the 16 floats at row p0 + i, columns
                // half·16 .. half·16 + 16 lie inside the kc·NR panel.
                unsafe { _mm512_storeu_ps(panel.as_mut_ptr().add((p0 + i) * NR + half * 16), *v) };
            }
        }
    }
}

/// Transposes a 16 × 16 block held as 16 rows: out[c][r] = rows[r][c].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(rows: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // 1. Interleave pairs of rows (32-bit elements).
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // 2. Interleave pairs of those (64-bit elements): u[4g + c] holds, in its
    //    128-bit lane l, column c + 4l of rows 4g .. 4g+4.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
        let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
        _mm512_castpd_ps(if c % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // 3. Gather 128-bit lanes: for groups (0, 1) and (2, 3), lanes {0, 2} and {1, 3}.
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let (pair, c, odd) = (i / 8, i % 4, (i / 4) % 2 == 1);
        let (a, b) = (u[8 * pair + c], u[8 * pair + 4 + c]);
        if odd {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        }
    });
    // 4. Final lanes: column c from (v[c], v[8 + c]) lanes {0, 2}, column c + 8
    //    from lanes {1, 3}; columns c + 4 and c + 12 likewise from v[4 + c], v[12 + c].
    std::array::from_fn(|col| {
        let (c, plus4, plus8) = (col % 4, (col / 4) % 2 == 1, col >= 8);
        let (a, b) = if plus4 {
            (v[4 + c], v[12 + c])
        } else {
            (v[c], v[8 + c])
        };
        if plus8 {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        }
    })
}

/// The portable micro-kernel: tile (+)= Σ_p A[tile rows, depth + p] ⊗ pb[p, :].
fn tile_portable(
    c: &mut [f32],
    ldc: usize,
    tile: Tile,
    kc: usize,
    a: Mat<'_>,
    pb: &[f32],
    add: bool,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for (p, b) in pb.chunks_exact(NR).take(kc).enumerate() {
        let col = (tile.depth + p) * a.col_stride;
        for (r, acc_row) in acc.iter_mut().enumerate().take(tile.rows) {
            let a_r = a.data[(tile.row + r) * a.row_stride + col];
            for (acc, &b_j) in acc_row.iter_mut().zip(b) {
                *acc += a_r * b_j;
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate().take(tile.rows) {
        let start = (tile.row + r) * ldc + tile.col;
        let out = &mut c[start..start + tile.cols];
        if add {
            for (o, &v) in out.iter_mut().zip(acc_row) {
                *o += v;
            }
        } else {
            out.copy_from_slice(&acc_row[..tile.cols]);
        }
    }
}

/// The AVX-512 micro-kernel for a tile of any height: dispatches to the
/// version specialised for its number of real rows, so a short tile (a
/// single token while generating, an expert with few tokens) costs only the
/// rows it has.
///
/// # Safety
/// As [`tile_avx512_rows`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(
    c: *mut f32,
    ldc: usize,
    tile: Tile,
    kc: usize,
    a: Mat<'_>,
    pb: &[f32],
    add: bool,
) {
    // SAFETY: the caller's contract, passed on unchanged.
    unsafe {
        match tile.rows {
            1 => tile_avx512_rows::<1>(c, ldc, tile, kc, a, pb, add),
            2 => tile_avx512_rows::<2>(c, ldc, tile, kc, a, pb, add),
            3 => tile_avx512_rows::<3>(c, ldc, tile, kc, a, pb, add),
            4 => tile_avx512_rows::<4>(c, ldc, tile, kc, a, pb, add),
            5 => tile_avx512_rows::<5>(c, ldc, tile, kc, a, pb, add),
            6 => tile_avx512_rows::<6>(c, ldc, tile, kc, a, pb, add),
            7 => tile_avx512_rows::<7>(c, ldc, tile, kc, a, pb, add),
            _ => tile_avx512_rows::<MR>(c, ldc, tile, kc, a, pb, add),
        }
    }
}

/// The AVX-512 micro-kernel: the same tile as [`tile_portable`], for exactly
/// `R` real rows, with its R × 32 accumulator held in 2R ZMM registers.
///
/// # Safety
/// The CPU must support AVX-512F; `pb` must hold `kc·NR` floats; `tile` must
/// have `R` rows and satisfy [`Tile::fits`] for C (row stride `ldc`, at `c`,
/// valid for reads and writes) and for `a` over `kc` depth.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512_rows<const R: usize>(
    c: *mut f32,
    ldc: usize,
    tile: Tile,
    kc: usize,
    a: Mat<'_>,
    pb: &[f32],
    add: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(pb.len() >= kc * NR && tile.rows == R);
    let rows: [*const f32; R] = std::array::from_fn(|r| {
        a.data[(tile.row + r) * a.row_stride + tile.depth * a.col_stride..].as_ptr()
    });
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let mut b = pb.as_ptr();
    for p in 0..kc {
        let offset = p * a.col_stride;
        // SAFETY: p < kc, so b[0..NR] lies inside `pb` and every row pointer
        // plus `offset` addresses A[row, depth + p], inside A by Tile::fits.
        unsafe {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for (row, acc_r) in rows.iter().zip(acc.iter_mut()) {
                let a_r = _mm512_set1_ps(*row.add(offset));
                acc_r[0] = _mm512_fmadd_ps(a_r, b0, acc_r[0]);
                acc_r[1] = _mm512_fmadd_ps(a_r, b1, acc_r[1]);
            }
            b = b.add(NR);
        }
    }
    // Lane masks for the real columns of each 16-wide half.
    let mask = |first: usize| -> __mmask16 {
        let n = tile.cols.saturating_sub(first).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    let (m0, m1) = (mask(0), mask(16));
    for (r, acc_r) in acc.iter().enumerate().take(tile.rows) {
        // SAFETY: row tile.row + r and the masked columns lie inside C (caller's
        // contract); masked-off lanes are neither read nor written.
        unsafe {
            let out = c.add((tile.row + r) * ldc + tile.col);
            let (mut v0, mut v1) = (acc_r[0], acc_r[1]);
            if add {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, out));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, out.add(16)));
            }
            _mm512_mask_storeu_ps(out, m0, v0);
            _mm512_mask_storeu_ps(out.add(16), m1, v1);
        }
    }
}
