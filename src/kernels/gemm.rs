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

/// How a product is computed. Chosen from the whole product's shape (never
/// from one thread's part of it), so every part computes its rows exactly as
/// a single thread would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    /// Pack B into NR-column panels per block, then run the micro-kernel:
    /// packing pays off when many rows of A reuse each panel.
    PackB,
    /// B's rows are contiguous and few rows of A (or a short depth) would
    /// reuse a packed panel: the micro-kernel reads B in place.
    BInPlace,
    /// B = Wᵀ with W row-major and few rows of A (the training step's
    /// y = x·Wᵀ on its tokens): 16-row blocks of W are multiplied with Aᵀ,
    /// so W is read once, in place, instead of being transposed into panels.
    WeightRows,
}

/// Rows of A up to which packing B does not pay (the training step's tokens
/// and an expert's routed rows are below it).
const FEW_ROWS: usize = 32;
/// Rows of A up to which [`Path::WeightRows`] beats packing: one block of
/// 16 tokens streams W once; more blocks would stream it again each
/// (`examples/gemm_compare`: 32 × 1024 × 256 took twice as long that way).
const WEIGHT_ROWS_MAX: usize = TOKENS;
/// Depth of one block read in place: a `KC_IN_PLACE × NR` strip of B is 16 KB,
/// so it stays in L1 while every row tile of A passes over it.
const KC_IN_PLACE: usize = 128;
/// Tokens per [`Path::WeightRows`] tile: one 16-lane register.
const TOKENS: usize = 16;

impl Path {
    /// The path for C [m, n] = A [m, k] · B [k, n].
    pub(super) fn choose(m: usize, k: usize, b: Mat<'_>, kernel: Kernel) -> Path {
        if kernel == Kernel::Portable {
            return Path::PackB;
        }
        if b.col_stride == 1 && (m <= FEW_ROWS || k <= FEW_ROWS) {
            Path::BInPlace
        } else if b.row_stride == 1 && m <= WEIGHT_ROWS_MAX {
            Path::WeightRows
        } else {
            Path::PackB
        }
    }
}

/// C (+)= A·B with shapes already checked by the caller (m, n, k > 0).
pub(super) fn gemm(
    mut c: MatMut<'_>,
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    kernel: Kernel,
    path: Path,
) {
    match path {
        Path::BInPlace => return gemm_b_in_place(&mut c, a, b, accumulate, kernel),
        Path::WeightRows => return gemm_weight_rows(&mut c, a, b, accumulate),
        Path::PackB => {}
    }
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

/// [`Path::BInPlace`]: every tile reads its rows of B straight from B.
///   for each depth block pc, each MR rows ir (one kernel call for all of
///   C's columns, strip by strip):  C[ir.., :] (+)= A[ir.., pc..] · B[pc.., :]
/// (C is written row block by row block, in address order.)
fn gemm_b_in_place(c: &mut MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool, kernel: Kernel) {
    let (m, n, k) = (c.rows, c.cols, a.cols);
    for pc in (0..k).step_by(KC_IN_PLACE) {
        let kc = KC_IN_PLACE.min(k - pc);
        // Only the first depth block may overwrite; later ones add.
        let add = accumulate || pc > 0;
        let strips = BPanel {
            data: &b.data[pc * b.row_stride..],
            ld: b.row_stride,
            step: NR,
        };
        for ir in (0..m).step_by(MR) {
            let tile = Tile {
                row: ir,
                col: 0,
                rows: MR.min(m - ir),
                cols: n,
                depth: pc,
            };
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => tile_avx512_checked(c, tile, kc, a, strips, add),
                _ => tile_portable(c, tile, kc, a, strips, add),
            }
        }
    }
}

thread_local! {
    /// Aᵀ of one [`Path::WeightRows`] block for this thread: [KC][TOKENS].
    static PACKED_AT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`Path::WeightRows`]: C [m, n] (+)= A [m, k] · Wᵀ, B = Wᵀ a view of W [n, k]
/// with contiguous rows. For each block of 16 tokens and each depth block
/// (the same KC blocks as the packed path, so the same sums to the bit):
///   Aᵀ block → [kc][16];  for each 16 rows of W:  Cᵀ tile = W rows · Aᵀ block
fn gemm_weight_rows(c: &mut MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let (m, n, k) = (c.rows, c.cols, a.cols);
    let ldw = b.col_stride;
    PACKED_AT.with_borrow_mut(|at| {
        if at.is_empty() {
            at.resize(KC * TOKENS, 0.0);
        }
        for t0 in (0..m).step_by(TOKENS) {
            let tokens = TOKENS.min(m - t0);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                pack_a_transposed(&mut at[..kc * TOKENS], a, t0, tokens, pc);
                let add = accumulate || pc > 0;
                for j0 in (0..n).step_by(TOKENS) {
                    let tile = WeightTile {
                        token: t0,
                        tokens,
                        col: j0,
                        cols: TOKENS.min(n - j0),
                        add,
                    };
                    let w = BPanel {
                        data: &b.data[j0 * ldw + pc..],
                        ld: ldw,
                        step: 0,
                    };
                    weight_tile_checked(c, tile, kc, w, &at[..kc * TOKENS]);
                }
            }
        }
    });
}

/// Aᵀ of tokens t0..t0+tokens over depth pc..pc+kc: at[p·16 + t] = A[t0 + t, pc + p],
/// zero for t ≥ tokens (by register transposes when A's rows are contiguous).
fn pack_a_transposed(at: &mut [f32], a: Mat<'_>, t0: usize, tokens: usize, pc: usize) {
    let kc = at.len() / TOKENS;
    #[cfg(target_arch = "x86_64")]
    if a.col_stride == 1 && tokens > 0 {
        assert!(tokens <= TOKENS && (t0 + tokens - 1) * a.row_stride + pc + kc <= a.data.len());
        let rows = &a.data[t0 * a.row_stride + pc..];
        // SAFETY: only Path::WeightRows packs Aᵀ, and it is chosen only for
        // the AVX-512 kernel, so the CPU has AVX-512F; rows t0..t0+tokens are
        // contiguous over depth pc..pc+kc inside `a.data` (asserted above),
        // TOKENS is 16, and `at` holds kc·TOKENS floats.
        return unsafe { pack_transposed_avx512(at, rows, a.row_stride, (kc, tokens, TOKENS)) };
    }
    for (p, lanes) in at.chunks_exact_mut(TOKENS).enumerate() {
        let col = (pc + p) * a.col_stride;
        for (t, lane) in lanes.iter_mut().enumerate() {
            *lane = if t < tokens {
                a.data[(t0 + t) * a.row_stride + col]
            } else {
                0.0
            };
        }
    }
}

/// One [`Path::WeightRows`] tile: C[token.., col..] for up to 16 tokens and 16 columns.
#[derive(Debug, Clone, Copy)]
struct WeightTile {
    /// First row of C (token).
    token: usize,
    /// Real tokens, ≤ 16.
    tokens: usize,
    /// First column of C (row of W).
    col: usize,
    /// Real columns, ≤ 16.
    cols: usize,
    /// Add into C instead of overwriting.
    add: bool,
}

/// A [`WeightTile`] by the AVX-512 kernel, after checking every bound it relies on.
fn weight_tile_checked(c: &mut MatMut<'_>, tile: WeightTile, kc: usize, w: BPanel<'_>, at: &[f32]) {
    assert!(
        (1..=TOKENS).contains(&tile.tokens)
            && (1..=TOKENS).contains(&tile.cols)
            && tile.token + tile.tokens <= c.rows
            && tile.col + tile.cols <= c.cols
            && at.len() >= kc * TOKENS
            && kc > 0
            && (tile.cols - 1) * w.ld + kc <= w.data.len()
    );
    let ldc = c.row_stride;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only Path::WeightRows reaches here, which Path::choose picks for
    // Kernel::Avx512 only (the CPU has AVX-512F); the tile lies inside C, W's
    // `cols` rows of `kc` depth inside `w.data`, and Aᵀ holds kc·16 floats
    // (all asserted just above); an 8-lane tile has at most 8 tokens.
    unsafe {
        let c = c.as_mut_ptr();
        if tile.tokens <= 8 {
            weight_tile_avx512::<std::arch::x86_64::__m256>(c, ldc, tile, kc, w, at)
        } else {
            weight_tile_avx512::<std::arch::x86_64::__m512>(c, ldc, tile, kc, w, at)
        }
    }
}

/// The registers a [`WeightTile`] accumulates in, lanes = tokens: 16 lanes
/// (`__m512`), or 8 (`__m256`) for tiles of at most 8 tokens — this CPU
/// retires two 8-lane multiply-adds per cycle but one 16-lane one, so a tile
/// with half its lanes idle runs twice as fast on 8. Each lane's arithmetic is
/// the same either way, so is every bit of C.
#[cfg(target_arch = "x86_64")]
trait TokenLanes: Copy {
    /// Zeros.
    ///
    /// # Safety
    /// The CPU must support AVX-512F (every method).
    unsafe fn zero() -> Self;
    /// The first lanes of a 16-float row of Aᵀ at `at`.
    ///
    /// # Safety
    /// AVX-512F, and `at` valid for reads of 16 floats.
    unsafe fn load(at: *const f32) -> Self;
    /// fma(w, a, acc) on every lane.
    ///
    /// # Safety
    /// AVX-512F.
    unsafe fn fma_splat(w: f32, a: Self, acc: Self) -> Self;
    /// The lanes in a 16-lane register, zeros past them.
    ///
    /// # Safety
    /// AVX-512F.
    unsafe fn widen(self) -> std::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
impl TokenLanes for std::arch::x86_64::__m512 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> Self {
        std::arch::x86_64::_mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(at: *const f32) -> Self {
        // SAFETY: the caller's contract: 16 floats readable at `at`.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(at) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma_splat(w: f32, a: Self, acc: Self) -> Self {
        use std::arch::x86_64::*;
        _mm512_fmadd_ps(_mm512_set1_ps(w), a, acc)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn widen(self) -> Self {
        self
    }
}

#[cfg(target_arch = "x86_64")]
impl TokenLanes for std::arch::x86_64::__m256 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> Self {
        std::arch::x86_64::_mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(at: *const f32) -> Self {
        // SAFETY: the caller's contract: 16 (so 8) floats readable at `at`.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(at) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma_splat(w: f32, a: Self, acc: Self) -> Self {
        use std::arch::x86_64::*;
        _mm256_fmadd_ps(_mm256_set1_ps(w), a, acc)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn widen(self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_zextps256_ps512(self)
    }
}

/// Cᵀ tile = W[col.., depth block] · Aᵀ block, accumulated in 16 registers
/// (one per row of W, lanes = tokens: 16 or 8 of them, see [`TokenLanes`]),
/// then transposed to C's rows:
///   acc_r = Σ_p W[col + r, p] · Aᵀ[p, :]     (the packed path's products and
///   order: fma(a, w, acc) = fma(w, a, acc) exactly)
///
/// # Safety
/// The CPU must support AVX-512F; the bounds of [`weight_tile_checked`] hold;
/// `c` is valid for reads and writes of C's rows at stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weight_tile_avx512<L: TokenLanes>(
    c: *mut f32,
    ldc: usize,
    tile: WeightTile,
    kc: usize,
    w: BPanel<'_>,
    at: &[f32],
) {
    use std::arch::x86_64::*;
    // Rows past `cols` repeat the last real row: read in bounds, never stored.
    let rows: [*const f32; TOKENS] =
        std::array::from_fn(|r| w.data[r.min(tile.cols - 1) * w.ld..].as_ptr());
    // SAFETY (every L method below): the CPU has AVX-512F (caller's contract).
    let mut acc = [unsafe { L::zero() }; TOKENS];
    // The next tile reads the next 16 rows of W over the same depths: kc cache
    // lines, one fetched per depth step (row p mod 16, line p / 16), so they
    // arrive while this tile computes. Into L2 (T1): requests into L1 would
    // wait for its few miss buffers, which this tile's own loads need
    // (examples/step_phases: the small step's forward 3.3 → 2.3 ms).
    let next_rows = w.data.as_ptr().wrapping_add(TOKENS * w.ld);
    // Eight rows at a time: eight row pointers stay in registers (sixteen
    // would spill, costing a reload per multiply-add); Aᵀ is read twice, from L1.
    for (half, acc) in acc.chunks_exact_mut(8).enumerate() {
        let rows: [*const f32; 8] = std::array::from_fn(|r| rows[8 * half + r]);
        for p in 0..kc {
            if half == 0 {
                let line = next_rows.wrapping_add((p % 16) * w.ld + (p / 16) * 16);
                _mm_prefetch::<_MM_HINT_T1>(line as *const i8);
            }
            // SAFETY: p < kc: Aᵀ row p is inside `at`, and W[row, p] inside
            // `w.data` for every (clamped) row (caller's contract).
            unsafe {
                let a = L::load(at.as_ptr().add(p * TOKENS));
                for (row, acc_r) in rows.iter().zip(acc.iter_mut()) {
                    *acc_r = L::fma_splat(*row.add(p), a, *acc_r);
                }
            }
        }
    }
    // SAFETY: the CPU has AVX-512F (caller's contract).
    let by_token = transpose16(acc.map(|lanes| unsafe { lanes.widen() }));
    let mask = ((1u32 << tile.cols) - 1) as __mmask16;
    for (t, &v) in by_token.iter().enumerate().take(tile.tokens) {
        // SAFETY: row token + t and the masked columns col..col+cols lie inside C
        // (caller's contract); masked-off lanes are neither read nor written.
        unsafe {
            let out = c.add((tile.token + t) * ldc + tile.col);
            let v = if tile.add {
                _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, out))
            } else {
                v
            };
            _mm512_mask_storeu_ps(out, mask, v);
        }
    }
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
/// the same order, as [`gemm`] — so the same result to the bit. C may be
/// columns `first_col ..` (a multiple of NR) of a product `n_packed` wide:
/// within each depth block, panel q of the packed B starts at q·NR·kc, so a
/// range of whole panels is one contiguous run.
pub(super) fn gemm_prepacked(
    mut c: MatMut<'_>,
    a: Mat<'_>,
    (packed, n_packed, first_col): (&[f32], usize, usize),
    accumulate: bool,
    kernel: Kernel,
) {
    let (n, k) = (c.cols, a.cols);
    assert!(first_col % NR == 0 && first_col + n <= n_packed);
    let n_pad = n_packed.div_ceil(NR) * NR;
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let start = pc * n_pad + (first_col + jc) * kc;
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
        let b = BPanel {
            data: pb,
            ld: NR,
            step: NR * kc,
        };
        for ir in (0..m).step_by(MR) {
            let tile = Tile {
                row: ir,
                col: jc + jr,
                rows: MR.min(m - ir),
                cols: NR.min(nc - jr),
                depth: pc,
            };
            match kernel {
                Kernel::Portable => tile_portable(c, tile, kc, a, b, add),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => tile_avx512_checked(c, tile, kc, a, b, add),
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
                let columns = &b.data[j0 * b.col_stride + pc..];
                // SAFETY: the CPU has AVX-512F; B's columns j0..j0+width are
                // contiguous over depth pc..pc+kc inside `b.data` (asserted above),
                // NR is a multiple of 16, and `panel` holds kc·NR floats.
                unsafe { pack_transposed_avx512(panel, columns, b.col_stride, (kc, width, NR)) }
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

/// Packs `width` (≤ `ld`) vectors that are contiguous over depth — columns of
/// a B = Wᵀ with W row-major, or rows of an A read as Aᵀ — side by side:
///   panel[p·ld + j] = src[j·stride + p]   for p < kc, j < width
/// (zero for width ≤ j < ld), by 16 × 16 register transposes: 16 vectors of
/// 16 depths each become 16 panel rows of 16.
///
/// # Safety
/// The CPU must support AVX-512F; `ld` must be a multiple of 16; for every
/// j < width, `src[j·stride .. j·stride + kc]` must be in bounds; `panel` must
/// hold `kc·ld` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_transposed_avx512(
    panel: &mut [f32],
    src: &[f32],
    stride: usize,
    (kc, width, ld): (usize, usize, usize),
) {
    use std::arch::x86_64::*;
    debug_assert!(panel.len() >= kc * ld && ld % 16 == 0);
    for half in 0..ld / 16 {
        for p0 in (0..kc).step_by(16) {
            let depth = (kc - p0).min(16);
            let depth_mask = ((1u32 << depth) - 1) as __mmask16;
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, row) in r.iter_mut().enumerate() {
                let j = half * 16 + i;
                if j < width {
                    // SAFETY: vector j exists and depths p0 .. p0+depth are in
                    // bounds (caller's contract); masked-off lanes are not read.
                    *row = unsafe {
                        _mm512_maskz_loadu_ps(depth_mask, src.as_ptr().add(j * stride + p0))
                    };
                }
            }
            let t = transpose16(r);
            for (i, v) in t.iter().enumerate().take(depth) {
                // SAFETY: (p0 + i) < kc, so the 16 floats at row p0 + i, columns
                // half·16 .. half·16 + 16 lie inside the kc·ld panel.
                unsafe { _mm512_storeu_ps(panel.as_mut_ptr().add((p0 + i) * ld + half * 16), *v) };
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

/// Rows of B for one tile: row p (of the tile's depth block) of its NR-column
/// strip s starts at `data[s·step + p·ld]` — a packed panel (`ld` = NR,
/// zero-padded; one strip) or B itself, read in place (`ld` = B's row stride,
/// `step` = NR, as many strips as the tile is wide).
#[derive(Debug, Clone, Copy)]
struct BPanel<'a> {
    data: &'a [f32],
    ld: usize,
    step: usize,
}

impl BPanel<'_> {
    /// True when rows 0..kc hold `cols` readable columns each.
    fn fits(&self, kc: usize, cols: usize) -> bool {
        let last_strip = cols.saturating_sub(1) / NR;
        kc == 0
            || cols == 0
            || last_strip * self.step + (kc - 1) * self.ld + (cols - last_strip * NR)
                <= self.data.len()
    }
}

/// The portable micro-kernel: tile (+)= Σ_p A[tile rows, depth + p] ⊗ B[p, :].
fn tile_portable(c: &mut MatMut<'_>, tile: Tile, kc: usize, a: Mat<'_>, b: BPanel<'_>, add: bool) {
    for (strip, first) in (0..tile.cols).step_by(NR).enumerate() {
        let cols = NR.min(tile.cols - first);
        let mut acc = [[0.0f32; NR]; MR];
        for p in 0..kc {
            let b_row = &b.data[strip * b.step + p * b.ld..][..cols];
            let col = (tile.depth + p) * a.col_stride;
            for (r, acc_row) in acc.iter_mut().enumerate().take(tile.rows) {
                let a_r = a.data[(tile.row + r) * a.row_stride + col];
                for (acc, &b_j) in acc_row.iter_mut().zip(b_row) {
                    *acc += a_r * b_j;
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate().take(tile.rows) {
            let start = tile.col + first;
            let out = &mut c.row_mut(tile.row + r)[start..start + cols];
            if add {
                for (o, &v) in out.iter_mut().zip(acc_row) {
                    *o += v;
                }
            } else {
                out.copy_from_slice(&acc_row[..cols]);
            }
        }
    }
}

/// One tile by the AVX-512 micro-kernel, after checking every bound it relies on.
#[cfg(target_arch = "x86_64")]
fn tile_avx512_checked(
    c: &mut MatMut<'_>,
    tile: Tile,
    kc: usize,
    a: Mat<'_>,
    b: BPanel<'_>,
    add: bool,
) {
    assert!(tile.fits(c.rows, c.cols, a, kc) && b.fits(kc, tile.cols));
    // SAFETY: the CPU has AVX-512F (only Kernel::Avx512 reaches here, and
    // Kernel::best checked it); the tile's rows and columns lie inside C, its
    // rows and depth inside A, and its kc rows of `tile.cols` columns inside B
    // (asserted just above; the views were bounds-checked on construction);
    // only those elements are read or written.
    unsafe { tile_avx512(c.as_mut_ptr(), c.row_stride, tile, kc, a, b, add) }
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
    b: BPanel<'_>,
    add: bool,
) {
    // SAFETY: the caller's contract, passed on unchanged.
    unsafe {
        match tile.rows {
            1 => tile_avx512_rows::<1>(c, ldc, tile, kc, a, b, add),
            2 => tile_avx512_rows::<2>(c, ldc, tile, kc, a, b, add),
            3 => tile_avx512_rows::<3>(c, ldc, tile, kc, a, b, add),
            4 => tile_avx512_rows::<4>(c, ldc, tile, kc, a, b, add),
            5 => tile_avx512_rows::<5>(c, ldc, tile, kc, a, b, add),
            6 => tile_avx512_rows::<6>(c, ldc, tile, kc, a, b, add),
            7 => tile_avx512_rows::<7>(c, ldc, tile, kc, a, b, add),
            _ => tile_avx512_rows::<MR>(c, ldc, tile, kc, a, b, add),
        }
    }
}

/// The AVX-512 micro-kernel: the same tile as [`tile_portable`], for exactly
/// `R` real rows, with its R × 32 accumulator held in 2R ZMM registers.
///
/// B is read through lane masks of the tile's real columns, so a panel packed
/// with zero padding and B read in place (nothing past its last column) give
/// the same tile.
///
/// # Safety
/// The CPU must support AVX-512F; `b` must satisfy [`BPanel::fits`] for `kc`
/// rows of `tile.cols` columns; `tile` must have `R` rows and satisfy
/// [`Tile::fits`] for C (row stride `ldc`, at `c`, valid for reads and writes)
/// and for `a` over `kc` depth.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512_rows<const R: usize>(
    c: *mut f32,
    ldc: usize,
    tile: Tile,
    kc: usize,
    a: Mat<'_>,
    b: BPanel<'_>,
    add: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(b.fits(kc, tile.cols) && tile.rows == R);
    let rows: [*const f32; R] = std::array::from_fn(|r| {
        a.data[(tile.row + r) * a.row_stride + tile.depth * a.col_stride..].as_ptr()
    });
    for (strip, first) in (0..tile.cols).step_by(NR).enumerate() {
        let cols = NR.min(tile.cols - first);
        // Lane masks for the real columns of each 16-wide half.
        let mask = |half: usize| ((1u32 << cols.saturating_sub(half).min(16)) - 1) as __mmask16;
        let (m0, m1) = (mask(0), mask(16));
        let c_col = c.wrapping_add(tile.col + first);
        // The next strip's C rows are written after this one: ask for them
        // now, so their read-for-ownership overlaps this strip's arithmetic.
        for r in 0..R {
            let next = c_col.wrapping_add((tile.row + r) * ldc + NR);
            _mm_prefetch::<_MM_HINT_ET0>(next as *const i8);
            _mm_prefetch::<_MM_HINT_ET0>(next.wrapping_add(16) as *const i8);
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let mut b_row = b.data.as_ptr().wrapping_add(strip * b.step);
        for p in 0..kc {
            let offset = p * a.col_stride;
            // B read in place walks down its rows: fetch the same place in the
            // next depth block, which the next call reads — into L2, as the
            // weight-rows tile does (the small step's forward + backward
            // 6.3 → 4.5 ms with both, examples/step_phases).
            let ahead = b_row.wrapping_add(kc * b.ld);
            _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(16) as *const i8);
            // SAFETY: p < kc, so the masked lanes of b_row[0..32] are B[p, real
            // columns of this strip], inside `b.data` (BPanel::fits; masked-off
            // lanes are not read, and wrapping_add forms their address without
            // claiming it is in bounds); every row pointer plus `offset`
            // addresses A[row, depth + p], inside A by Tile::fits.
            unsafe {
                let b0 = _mm512_maskz_loadu_ps(m0, b_row);
                let b1 = _mm512_maskz_loadu_ps(m1, b_row.wrapping_add(16));
                for (row, acc_r) in rows.iter().zip(acc.iter_mut()) {
                    let a_r = _mm512_set1_ps(*row.add(offset));
                    acc_r[0] = _mm512_fmadd_ps(a_r, b0, acc_r[0]);
                    acc_r[1] = _mm512_fmadd_ps(a_r, b1, acc_r[1]);
                }
            }
            b_row = b_row.wrapping_add(b.ld);
        }
        for (r, acc_r) in acc.iter().enumerate() {
            // SAFETY: row tile.row + r and this strip's masked columns lie
            // inside C (caller's contract); masked-off lanes are neither read
            // nor written, and wrapping_add forms the second half's address
            // even when it is past C.
            unsafe {
                let out = c_col.add((tile.row + r) * ldc);
                let (mut v0, mut v1) = (acc_r[0], acc_r[1]);
                if add {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, out));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, out.wrapping_add(16)));
                }
                _mm512_mask_storeu_ps(out, m0, v0);
                _mm512_mask_storeu_ps(out.wrapping_add(16), m1, v1);
            }
        }
    }
}
