//! The matrix multiply behind [`super::matmul`]: C (+)= A·B.
//!
//! A BLIS-style blocked GEMM, written once over the SIMD vocabulary
//! ([`Simd`]) and compiled for every level. B is packed into panels of `NR`
//! columns (zero-padded at the edge), A into panels of `MR` rows, `MC` rows
//! at a time, then a register-tiled micro-kernel computes each `MR × NR`
//! tile of C over a block of `KC` depth:
//!
//! ```text
//! for each block of NC columns (jc), each block of KC depth (pc):
//!     pack B[pc.., jc..]                      → panels [n/NR][KC][NR]
//!     for each block of MC rows (ic):
//!         pack A[ic.., pc..]                  → panels [MC/MR] of MR × KC
//!         for each NR panel (jr), each MR rows (ir):
//!             C[ir.., jr..] (+)= A_panel · B_panel
//! ```
//!
//! The B panel stays in L1 while the row panels of the A block, in L2,
//! stream past it. Unpacked, A's rows would come from wherever A lies, once
//! per B panel — and the rows of an A read as a transpose (dW = dyᵀ·x) lie
//! a weight's width apart, 4 KB for the small model's experts, so every
//! depth step of a tile fell in the same L1 set. A row-major A of at most
//! MC rows is read in place: it stays in cache by itself, and copying it
//! cost more than it saved ([`a_panels`]).
//!
//! **One order of arithmetic, whatever the tiling.** Every element of C is
//! one chain of fused multiply-adds over the whole depth, in depth order:
//!   c ← 0 (or C's old value when accumulating);  for p in 0..k: c ← fma(A[i,p], B[p,j], c)
//! A tile that continues a product over a later depth block starts from the
//! C it left, so neither the block sizes, nor the tile shape (which differs
//! by level: MR × NR = 8 × 32 on AVX-512, 6 × 16 on AVX2 and NEON), nor the
//! path below, nor the thread that computes a tile changes a bit of C.
//!
//! The packing buffers are thread-local and allocated once, at their largest
//! size, on a thread's first multiply; afterwards no call allocates.
//!
//! The weights of a model that is only being run (not trained) are packed
//! once ([`pack_weight`]) and multiplied from their panels
//! ([`gemm_prepacked`]) without re-packing on every product.

use std::cell::RefCell;

use super::simd::{Simd, Token, array_of, load_at, simd_call, store_at};
use super::{Mat, MatMut};

/// Most rows of C in one micro-kernel tile, at any level.
pub(super) const MR_MAX: usize = 8;
/// Packed weights pad their columns to a multiple of this (every level's NR divides it).
const NR_PAD: usize = 32;
/// Depth of one packed block: a `KC × NR` B panel is 16–32 KB.
const KC: usize = 256;
/// Columns of one packed B block (`KC × NC` floats = 512 KB).
const NC: usize = 512;
/// Rows of one packed A block (`MC × KC` floats = 144 KB, in L2 beside the
/// B panels passing through; a multiple of every level's MR).
const MC: usize = 144;

/// The tile of a level: (MR rows, NR columns).
pub(super) fn tile_shape(token: Token) -> (usize, usize) {
    fn of<S: Simd>(_: S) -> (usize, usize) {
        (S::TILE_ROWS, 16 * S::TILE_VECS)
    }
    simd_call!(token, of())
}

thread_local! {
    /// This thread's packing buffer: packed B then packed A
    /// ([`Path::PackB`], NC·KC + MC·KC), or the Aᵀ block of
    /// [`Path::WeightRows`] (KC·TOKENS). Taken out for each
    /// product and put back (the kernels run outside `LocalKey`'s closures,
    /// which would be compiled without their instruction set).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// How a product is computed. Chosen from the whole product's shape (never
/// from one thread's part of it, nor from the level).
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
/// Most depth of one block read in place: a `KC_IN_PLACE × NR` strip of B is
/// 8–16 KB, read by every row tile of A in turn while it is in cache.
const KC_IN_PLACE: usize = 128;
/// Most floats of B in one depth block read in place (128 KB: a block and
/// the next one, fetched ahead, fit in L2 beside the rest). On a Zen 3
/// (`examples/cold_weights`, dX on the small model's expert shapes) 64 KB
/// blocks were slower for W [256, 1024] and 256 KB ones for a cold W [2048, 256].
const IN_PLACE_BLOCK: usize = 32768;
/// A row stride of W (in floats) at which every row of W starts in the same
/// L1 set (4 KB apart or a multiple): the eight rows a paired tile reads at
/// once would then evict each other, so such weights keep the one-row tile
/// (`examples/cold_weights` on a Zen 3, x·Wᵀ for 8 tokens: on W [256, 1024]
/// paired took 1.1–1.3× as long; on W [2048, 256] 0.6–0.7× cold, the same hot).
const ALIASED_ROWS: usize = 1024;
/// Tokens per [`Path::WeightRows`] tile: one 16-lane vector. One block of
/// 16 tokens streams W once; more blocks would stream it again each
/// (`examples/gemm_compare`: 32 × 1024 × 256 took twice as long that way).
const TOKENS: usize = 16;

impl Path {
    /// The path for C [m, n] = A [m, k] · B [k, n].
    pub(super) fn choose(m: usize, k: usize, b: Mat<'_>) -> Path {
        if b.col_stride == 1 && (m <= FEW_ROWS || k <= FEW_ROWS) {
            Path::BInPlace
        } else if b.row_stride == 1 && m <= TOKENS {
            Path::WeightRows
        } else {
            Path::PackB
        }
    }
}

/// C (+)= A·B with shapes already checked by the caller (m, n, k > 0), at
/// the level of `token`.
pub(super) fn gemm(
    c: MatMut<'_>,
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    token: Token,
    path: Path,
) {
    with_scratch(|scratch| simd_call!(token, gemm_at(c, a, b, accumulate, path, scratch)));
}

/// Runs `f` on this thread's packing buffer, allocated at its largest size
/// on the thread's first product.
fn with_scratch(f: impl FnOnce(&mut [f32])) {
    let mut scratch = SCRATCH.take();
    if scratch.is_empty() {
        scratch.resize(((NC + MC) * KC).max(KC * TOKENS), 0.0);
    }
    f(&mut scratch);
    SCRATCH.set(scratch);
}

#[inline(always)]
fn gemm_at<S: Simd>(
    s: S,
    mut c: MatMut<'_>,
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    path: Path,
    scratch: &mut [f32],
) {
    match path {
        Path::BInPlace => return gemm_b_in_place(s, &mut c, a, b, accumulate),
        Path::WeightRows => return gemm_weight_rows(s, &mut c, a, b, accumulate, scratch),
        Path::PackB => {}
    }
    let (n, k) = (c.cols, a.cols);
    let (packed_b, packed_a) = scratch.split_at_mut(NC * KC);
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack_b(s, packed_b, b, (pc, kc), (jc, nc));
            let block = Block { jc, nc, pc, kc };
            multiply_block(s, &mut c, a, packed_a, packed_b, block, accumulate);
        }
    }
}

/// [`Path::BInPlace`]: every tile reads its rows of B straight from B, strip
/// by strip, every row tile of C passing over a strip before the next:
///   for each depth block pc, each NR-column strip jr, each row tile ir:
///       C[ir.., jr..] (+)= A[ir.., pc..] · B[pc.., jr..]
/// so the later row tiles find the strip in cache. Row tiles are as even as
/// the tile height allows (8 rows: 4 + 4, not 6 + 2: a short tile needs B
/// at the rate of its few multiply-adds per row). While the first row tile
/// runs it fetches the next depth block in address order, so a B that is
/// not in cache streams from memory as fast as memory allows; a block is at
/// most [`IN_PLACE_BLOCK`] floats, so it and the next fit in L2 together.
#[inline(always)]
fn gemm_b_in_place<S: Simd>(s: S, c: &mut MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let (m, n, k) = (c.rows, c.cols, a.cols);
    let nr = 16 * S::TILE_VECS;
    let height = m.div_ceil(m.div_ceil(S::TILE_ROWS));
    let depth = (IN_PLACE_BLOCK / n).clamp(16, KC_IN_PLACE) / 16 * 16;
    for pc in (0..k).step_by(depth) {
        let kc = depth.min(k - pc);
        let next_block = b.data.as_ptr().wrapping_add((pc + kc) * b.row_stride);
        for jr in (0..n).step_by(nr) {
            for ir in (0..m).step_by(height) {
                let ahead = if ir > 0 || pc + kc >= k {
                    Ahead::Nothing
                } else {
                    Ahead::Lines(next_block.wrapping_add(jr * kc))
                };
                let strip = BPanel {
                    data: &b.data[pc * b.row_stride + jr..],
                    ld: b.row_stride,
                    step: nr,
                    packed: false,
                    ahead,
                };
                let tile = Tile {
                    row: ir,
                    col: jr,
                    rows: height.min(m - ir),
                    cols: nr.min(n - jr),
                };
                let a_tile = a.row_block(ir, tile.rows).col_block(pc, kc);
                tile_checked(s, c, tile, kc, a_tile, strip, accumulate || pc > 0);
            }
        }
    }
}

/// [`Path::WeightRows`]: C [m, n] (+)= A [m, k] · Wᵀ, B = Wᵀ a view of W [n, k]
/// with contiguous rows. For each block of 16 tokens and each depth block:
///   Aᵀ block → [kc][16];  for each 16 rows of W:  Cᵀ tile (+)= W rows · Aᵀ block
/// A block of at most 8 tokens, on a level with [`Simd::PAIRED_WEIGHT_ROWS`],
/// fills the lanes with two rows of W instead (a tile of 32 rows; see
/// [`WeightTile::paired`]).
#[inline(always)]
fn gemm_weight_rows<S: Simd>(
    s: S,
    c: &mut MatMut<'_>,
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    scratch: &mut [f32],
) {
    let (m, n, k) = (c.rows, c.cols, a.cols);
    let ldw = b.col_stride;
    let at = &mut scratch[..KC * TOKENS];
    for t0 in (0..m).step_by(TOKENS) {
        let tokens = TOKENS.min(m - t0);
        let paired =
            S::PAIRED_WEIGHT_ROWS && tokens <= TOKENS / 2 && !ldw.is_multiple_of(ALIASED_ROWS);
        let width = if paired { 2 * TOKENS } else { TOKENS };
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let at = &mut at[..kc * TOKENS];
            pack_a_transposed(s, at, a, t0, tokens, pc);
            if paired {
                // Lanes 8..16 repeat lanes 0..8: the tokens again, for the second row of W.
                at.chunks_exact_mut(TOKENS)
                    .for_each(|lanes| lanes.copy_within(..TOKENS / 2, TOKENS / 2));
            }
            for j0 in (0..n).step_by(width) {
                let tile = WeightTile {
                    token: t0,
                    tokens,
                    col: j0,
                    cols: width.min(n - j0),
                    add: accumulate || pc > 0,
                    paired,
                };
                let w = BPanel {
                    data: &b.data[j0 * ldw + pc..],
                    ld: ldw,
                    step: 0,
                    packed: false,
                    ahead: Ahead::Nothing,
                };
                weight_tile_checked(s, c, tile, kc, w, at);
            }
        }
    }
}

/// Aᵀ of tokens t0..t0+tokens over depth pc..pc+kc: at[p·16 + t] = A[t0 + t, pc + p],
/// zero for t ≥ tokens (by register transposes when A's rows are contiguous).
#[inline(always)]
fn pack_a_transposed<S: Simd>(
    s: S,
    at: &mut [f32],
    a: Mat<'_>,
    t0: usize,
    tokens: usize,
    pc: usize,
) {
    let kc = at.len() / TOKENS;
    if a.col_stride == 1 && tokens > 0 {
        let rows = &a.data[t0 * a.row_stride + pc..];
        return pack_transposed(s, at, rows, a.row_stride, (kc, tokens, TOKENS));
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

/// One [`Path::WeightRows`] tile: C[token.., col..] for up to 16 tokens and
/// 16 columns, or (paired) up to 8 tokens and 32 columns.
#[derive(Debug, Clone, Copy)]
struct WeightTile {
    /// First row of C (token).
    token: usize,
    /// Real tokens, ≤ 16 (≤ 8 when paired).
    tokens: usize,
    /// First column of C (row of W).
    col: usize,
    /// Real columns, ≤ 16 (≤ 32 when paired).
    cols: usize,
    /// Continue from C's values instead of starting from zero.
    add: bool,
    /// Vector i holds row col + i of W in lanes 0..8 and row col + 16 + i in
    /// lanes 8..16 (each over the ≤ 8 tokens), instead of row col + i over
    /// 16 tokens.
    paired: bool,
}

impl WeightTile {
    /// Where lane `lane` of the tile's vectors, transposed, belongs in C:
    /// (token offset, first column offset, real columns), if anywhere.
    fn lane_place(&self, lane: usize) -> Option<(usize, usize, usize)> {
        let (token, first) = if self.paired {
            (lane % (TOKENS / 2), TOKENS * (lane / (TOKENS / 2)))
        } else {
            (lane, 0)
        };
        (token < self.tokens && first < self.cols)
            .then(|| (token, first, (self.cols - first).min(TOKENS)))
    }
}

/// A [`WeightTile`], after checking every bound the kernel relies on.
#[inline(always)]
fn weight_tile_checked<S: Simd>(
    s: S,
    c: &mut MatMut<'_>,
    tile: WeightTile,
    kc: usize,
    w: BPanel<'_>,
    at: &[f32],
) {
    let (most_tokens, most_cols) = if tile.paired {
        (TOKENS / 2, 2 * TOKENS)
    } else {
        (TOKENS, TOKENS)
    };
    assert!(
        (1..=most_tokens).contains(&tile.tokens)
            && (1..=most_cols).contains(&tile.cols)
            && tile.token + tile.tokens <= c.rows
            && tile.col + tile.cols <= c.cols
            && at.len() >= kc * TOKENS
            && kc > 0
            && (tile.cols - 1) * w.ld + kc <= w.data.len()
    );
    let (ldc, c) = (c.row_stride, c.as_mut_ptr());
    // SAFETY: the tile lies inside C, W's `cols` rows of `kc` depth inside
    // `w.data`, and Aᵀ holds kc·16 floats (all asserted just above).
    unsafe {
        match (S::WEIGHT_ROWS, tile.paired) {
            (4, false) => weight_tile::<S, 4, false>(s, c, ldc, tile, kc, w, at),
            (4, true) => weight_tile::<S, 4, true>(s, c, ldc, tile, kc, w, at),
            (_, false) => weight_tile::<S, 8, false>(s, c, ldc, tile, kc, w, at),
            (_, true) => weight_tile::<S, 8, true>(s, c, ldc, tile, kc, w, at),
        }
    }
}

/// Cᵀ tile = W[col.., depth block] · Aᵀ block, accumulated in 16 vectors
/// (lanes = tokens; one row of W per vector, or two when `PAIRED`; G vectors
/// at a time in registers), then transposed to C's rows:
///   acc_i = C[:, col + i]ᵀ (or 0);  for p: acc_i ← fma(W[col + i, p], Aᵀ[p, :], acc_i)
/// — the packed path's products in its order (fma(a, w, c) = fma(w, a, c) exactly).
///
/// # Safety
/// The bounds of [`weight_tile_checked`] hold; `c` is valid for reads and
/// writes of C's rows at stride `ldc`.
#[inline(always)]
unsafe fn weight_tile<S: Simd, const G: usize, const PAIRED: bool>(
    s: S,
    c: *mut f32,
    ldc: usize,
    tile: WeightTile,
    kc: usize,
    w: BPanel<'_>,
    at: &[f32],
) {
    // Row r of the tile: W[col + r] (lanes 0..8, or all 16) and, when
    // paired, W[col + 16 + r] (lanes 8..16). Rows past `cols` repeat the
    // last real row: read in bounds, never stored.
    let rows_from = |first: usize| -> [*const f32; TOKENS] {
        array_of(
            #[inline(always)]
            |r| w.data[(first + r).min(tile.cols - 1) * w.ld..].as_ptr(),
        )
    };
    let (lo, hi) = (rows_from(0), rows_from(if PAIRED { TOKENS } else { 0 }));
    let place = |lane: usize| {
        tile.lane_place(lane).map(|(t, first, cols)| {
            let out = c.wrapping_add((tile.token + t) * ldc + tile.col + first);
            (out, cols)
        })
    };
    let mut acc = [s.zero(); TOKENS];
    if tile.add {
        let by_lane = array_of(
            #[inline(always)]
            |lane| match place(lane) {
                // SAFETY: that token's row and columns lie inside C (caller's contract).
                Some((out, cols)) => unsafe { load_cols(s, out, cols) },
                None => s.zero(),
            },
        );
        acc = s.transpose(by_lane);
    }
    // The next tile reads the next 16 (paired: 32) rows of W over the same
    // depths: kc cache lines per 16 rows, one fetched per depth step (row
    // p mod 16, line p / 16) by each of the first one or two groups, so they
    // arrive while this tile computes (into L2: requests into L1 would wait
    // for its few miss buffers, which this tile's own loads need).
    let height = if PAIRED { 2 * TOKENS } else { TOKENS };
    let next_rows = w.data.as_ptr().wrapping_add(height * w.ld);
    for (group, acc) in acc.chunks_exact_mut(G).enumerate() {
        let first = G * group;
        let lo: [*const f32; G] = array_of(
            #[inline(always)]
            |r| lo[first + r],
        );
        let hi: [*const f32; G] = array_of(
            #[inline(always)]
            |r| hi[first + r],
        );
        for p in 0..kc {
            if group < height / TOKENS {
                let line = (TOKENS * group + p % 16) * w.ld + (p / 16) * 16;
                s.prefetch(next_rows.wrapping_add(line));
            }
            // SAFETY: p < kc: Aᵀ row p is inside `at`, and W[row, p] inside
            // `w.data` for every (clamped) row (caller's contract).
            unsafe {
                let a = s.load(at.as_ptr().add(p * TOKENS));
                for ((lo, hi), acc_r) in lo.iter().zip(&hi).zip(acc.iter_mut()) {
                    let w = if PAIRED {
                        s.splat_halves(*lo.add(p), *hi.add(p))
                    } else {
                        s.splat(*lo.add(p))
                    };
                    *acc_r = s.mul_add(w, a, *acc_r);
                }
            }
        }
    }
    for (lane, &v) in s.transpose(acc).iter().enumerate() {
        if let Some((out, cols)) = place(lane) {
            // SAFETY: that token's row and columns lie inside C.
            unsafe { store_cols(s, out, cols, v) };
        }
    }
}

/// Length of B = Wᵀ (W [n, k] row-major) packed by [`pack_weight`]:
/// every depth block holds all ⌈n/32⌉·32 columns in panels.
pub(super) fn packed_len(n: usize, k: usize) -> usize {
    n.div_ceil(NR_PAD) * NR_PAD * k
}

/// Packs B = Wᵀ once, in the panels of `token`'s tile: for each depth block
/// pc, panel q holds kc rows of NR values.
pub(super) fn pack_weight(packed: &mut [f32], b: Mat<'_>, token: Token) {
    simd_call!(token, pack_weight_at(packed, b))
}

#[inline(always)]
fn pack_weight_at<S: Simd>(s: S, packed: &mut [f32], b: Mat<'_>) {
    let (k, n) = (b.rows, b.cols);
    let n_pad = n.div_ceil(NR_PAD) * NR_PAD;
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        let block = &mut packed[pc * n_pad..pc * n_pad + kc * n_pad];
        pack_b(s, block, b, (pc, kc), (0, n));
        // Panels past the last real one (padding to NR_PAD) stay zero.
        let used = n.div_ceil(16 * S::TILE_VECS) * 16 * S::TILE_VECS * kc;
        block[used..].fill(0.0);
    }
}

/// C (+)= A·B with B already packed by [`pack_weight`] at `token`'s level.
/// C may be columns `first_col ..` (a multiple of NR) of a product
/// `n_packed` wide: within each depth block, panel q of the packed B starts
/// at q·NR·kc, so a range of whole panels is one contiguous run.
pub(super) fn gemm_prepacked(
    c: MatMut<'_>,
    a: Mat<'_>,
    packed: (&[f32], usize, usize),
    accumulate: bool,
    token: Token,
) {
    with_scratch(|scratch| simd_call!(token, gemm_prepacked_at(c, a, packed, accumulate, scratch)));
}

#[inline(always)]
fn gemm_prepacked_at<S: Simd>(
    s: S,
    mut c: MatMut<'_>,
    a: Mat<'_>,
    (packed, n_packed, first_col): (&[f32], usize, usize),
    accumulate: bool,
    scratch: &mut [f32],
) {
    let (n, k, nr) = (c.cols, a.cols, 16 * S::TILE_VECS);
    assert!(first_col % nr == 0 && first_col + n <= n_packed);
    let n_pad = n_packed.div_ceil(NR_PAD) * NR_PAD;
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let start = pc * n_pad + (first_col + jc) * kc;
            let panels = &packed[start..start + nc.div_ceil(nr) * nr * kc];
            let block = Block { jc, nc, pc, kc };
            multiply_block(s, &mut c, a, scratch, panels, block, accumulate);
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

/// Every tile of one block: C[:, jc..jc+nc] (+)= A[:, pc..pc+kc] · panels,
/// MC rows at a time, each block of A in panels ([`a_panels`]) first.
#[inline(always)]
fn multiply_block<S: Simd>(
    s: S,
    c: &mut MatMut<'_>,
    a: Mat<'_>,
    packed_a: &mut [f32],
    panels: &[f32],
    block: Block,
    accumulate: bool,
) {
    let Block { jc, nc, pc, kc } = block;
    let (m, mr, nr) = (c.rows, S::TILE_ROWS, 16 * S::TILE_VECS);
    for ic in (0..m).step_by(MC) {
        let mc = MC.min(m - ic);
        let block_a = a.row_block(ic, mc).col_block(pc, kc);
        let a_panels = a_panels(s, packed_a, block_a, m <= MC);
        for jr in (0..nc).step_by(nr) {
            let b = BPanel {
                data: &panels[jr * kc..(jr + nr) * kc],
                ld: nr,
                step: nr * kc,
                packed: true,
                ahead: Ahead::NextStrip,
            };
            for (q, ir) in (0..mc).step_by(mr).enumerate() {
                let tile = Tile {
                    row: ic + ir,
                    col: jc + jr,
                    rows: mr.min(mc - ir),
                    cols: nr.min(nc - jr),
                };
                let a_tile = a_panels.panel(q, tile.rows);
                tile_checked(s, c, tile, kc, a_tile, b, accumulate || pc > 0);
            }
        }
    }
}

/// A block of A as the micro-kernel reads it: panel q holds rows q·MR.. of
/// the block, its element (r, p) at `data[q·step + r·row_stride + p·col_stride]`.
#[derive(Debug, Clone, Copy)]
struct APanels<'a> {
    data: &'a [f32],
    step: usize,
    row_stride: usize,
    col_stride: usize,
    kc: usize,
}

impl<'a> APanels<'a> {
    /// The first `rows` rows of panel q, as a view over the block's depth.
    fn panel(&self, q: usize, rows: usize) -> Mat<'a> {
        Mat {
            data: &self.data[(q * self.step).min(self.data.len())..],
            rows,
            cols: self.kc,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

/// Block `a` [mc, kc] in panels of `mr` rows: read in place when its rows
/// are contiguous and it is A's only block (it then stays in cache from
/// one B panel to the next by itself), otherwise copied into `out` as
/// contiguous panels — each keeping A's own orientation, so that the copy
/// runs along whichever of A's axes is contiguous: rows of a row-major A
/// ([mr][kc]), columns of a transposed view ([kc][mr]). On a Zen 3
/// (`examples/gemm_compare`, fastest of 3 runs each): copying made the
/// small model's products of 32–64 rows 1–10 % slower; for 2,048 rows,
/// and for A = dyᵀ, copying made them up to 1.2× faster.
#[inline(always)]
fn a_panels<'o, S: Simd>(s: S, out: &'o mut [f32], a: Mat<'o>, only_block: bool) -> APanels<'o> {
    let (mc, kc, mr) = (a.rows, a.cols, S::TILE_ROWS);
    let by_rows = a.col_stride == 1;
    if by_rows && only_block {
        return APanels {
            data: a.data,
            step: mr * a.row_stride,
            row_stride: a.row_stride,
            col_stride: 1,
            kc,
        };
    }
    let size = mr * kc;
    let out = &mut out[..mc.div_ceil(mr) * size];
    if by_rows {
        for (q, panel) in out.chunks_exact_mut(size).enumerate() {
            for (r, dst) in panel
                .chunks_exact_mut(kc)
                .take(mr.min(mc - q * mr))
                .enumerate()
            {
                let start = (q * mr + r) * a.row_stride;
                dst.copy_from_slice(&a.data[start..start + kc]);
            }
        }
    } else {
        columns_to_panels(s, out, a);
    }
    let (row_stride, col_stride) = if by_rows { (kc, 1) } else { (1, mr) };
    APanels {
        data: out,
        step: size,
        row_stride,
        col_stride,
        kc,
    }
}

/// Columns of A that [`columns_to_panels`] asks the cache for ahead of the one it copies.
const COLUMNS_AHEAD: usize = 4;

/// A transposed view `a` [mc, kc] (its columns contiguous) into panels of
/// MR = `S::TILE_ROWS` rows, each laid out [kc][MR]:
///   out[q·MR·kc + p·MR + r] = A[q·MR + r, p]
/// Depth by depth, so A's memory is read in address order, one contiguous
/// column of `mc` floats at a time; the panel-by-panel order read `MR`
/// floats from each of kc columns a whole column stride apart (4 KB for
/// the small model's dW = dyᵀ·x, all in one L1 set): `perf` put a fifth
/// of such a product's samples in that copy on a Zen 4. Rows past `mc` in
/// the last panel are left as they are: no tile reads them.
#[inline(always)]
fn columns_to_panels<S: Simd>(s: S, out: &mut [f32], a: Mat<'_>) {
    let (mc, kc, mr) = (a.rows, a.cols, S::TILE_ROWS);
    let full = mc / mr;
    for p in 0..kc {
        let ahead = a
            .data
            .as_ptr()
            .wrapping_add((p + COLUMNS_AHEAD) * a.col_stride);
        for line in (0..mc).step_by(16) {
            s.prefetch(ahead.wrapping_add(line));
        }
        let column = &a.data[p * a.col_stride..p * a.col_stride + mc];
        // Whole panels copy MR floats, a constant of the level (no memmove call).
        for q in 0..full {
            let at = q * mr * kc + p * mr;
            out[at..at + mr].copy_from_slice(&column[q * mr..q * mr + mr]);
        }
        let rest = mc - full * mr;
        if rest > 0 {
            let at = full * mr * kc + p * mr;
            out[at..at + rest].copy_from_slice(&column[full * mr..]);
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
    /// Real columns (≤ NR, or more for B read in place: strip by strip).
    cols: usize,
}

impl Tile {
    /// True when the tile lies inside C [rows, cols] and `a` (the tile's
    /// rows of A from the depth block's start) holds its rows over `kc` depth.
    fn fits(&self, rows: usize, cols: usize, a: Mat<'_>, kc: usize) -> bool {
        (1..=MR_MAX).contains(&self.rows)
            && self.row + self.rows <= rows
            && self.col + self.cols <= cols
            && self.rows <= a.rows
            && kc <= a.cols
    }
}

/// Packs B[pc..pc+kc, jc..jc+nc] into panels of NR columns: panel q holds, for
/// each depth p, the NR values B[pc+p, jc+q·NR ..], zero past column nc.
#[inline(always)]
fn pack_b<S: Simd>(
    s: S,
    out: &mut [f32],
    b: Mat<'_>,
    (pc, kc): (usize, usize),
    (jc, nc): (usize, usize),
) {
    let nr = 16 * S::TILE_VECS;
    for (q, panel) in out[..nc.div_ceil(nr) * nr * kc]
        .chunks_exact_mut(nr * kc)
        .enumerate()
    {
        let j0 = jc + q * nr;
        let width = nr.min(jc + nc - j0);
        if b.col_stride == 1 {
            // Rows of B are contiguous: NR-wide row pieces, vector by
            // vector (zeros past `width`). As slice copies of a width only
            // known at run time each was a call to memmove: a tenth of the
            // `perf` samples of dW = dyᵀ·x [256, 2048]·[2048, 1024] on a Zen 4.
            for (p, dst) in panel.chunks_exact_mut(nr).enumerate() {
                let start = (pc + p) * b.row_stride + j0;
                let row = &b.data[start..start + width];
                for j in (0..nr).step_by(16) {
                    store_at(s, dst, j, load_at(s, row, j));
                }
            }
        } else if b.row_stride == 1 {
            // Columns of B are contiguous (B = Wᵀ): register transposes.
            let columns = &b.data[j0 * b.col_stride + pc..];
            pack_transposed(s, panel, columns, b.col_stride, (kc, width, nr));
        } else {
            for (p, dst) in panel.chunks_exact_mut(nr).enumerate() {
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = if j < width {
                        b.data[(pc + p) * b.row_stride + (j0 + j) * b.col_stride]
                    } else {
                        0.0
                    };
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
#[inline(always)]
fn pack_transposed<S: Simd>(
    s: S,
    panel: &mut [f32],
    src: &[f32],
    stride: usize,
    (kc, width, ld): (usize, usize, usize),
) {
    assert!(
        panel.len() >= kc * ld
            && ld % 16 == 0
            && width <= ld
            && (width == 0 || (width - 1) * stride + kc <= src.len())
    );
    for block in 0..ld / 16 {
        for p0 in (0..kc).step_by(16) {
            let depth = (kc - p0).min(16);
            let rows: [S::V; 16] = array_of(
                #[inline(always)]
                |i| {
                    let j = block * 16 + i;
                    if j < width {
                        // Vector j's depths p0 .. p0+depth (inside `src`, asserted above).
                        let start = j * stride + p0;
                        load_at(s, &src[start..start + depth], 0)
                    } else {
                        s.zero()
                    }
                },
            );
            for (i, v) in s.transpose(rows).into_iter().enumerate().take(depth) {
                let at = (p0 + i) * ld + block * 16;
                store_at(s, &mut panel[at..at + 16], 0, v);
            }
        }
    }
}

/// Rows of B for one tile: row p (of the tile's depth block) of its NR-column
/// strip q starts at `data[q·step + p·ld]` — a packed panel (`ld` = NR,
/// zero-padded; one strip) or B itself, read in place (`ld` = B's row stride,
/// `step` = NR, as many strips as the tile is wide).
#[derive(Debug, Clone, Copy)]
struct BPanel<'a> {
    data: &'a [f32],
    ld: usize,
    step: usize,
    /// A zero-padded packed panel: every row holds NR readable floats.
    packed: bool,
    /// What the tile asks the cache for while it runs.
    ahead: Ahead,
}

/// Lines a tile prefetches into L2, one per depth step and vector (hints:
/// never read, so any address will do).
#[derive(Debug, Clone, Copy)]
enum Ahead {
    /// The same rows of the next strip or panel (`step` on).
    NextStrip,
    /// Consecutive lines from here, NR floats per depth step: a stretch of
    /// the next depth block of a B read in place, in address order (the order
    /// DRAM streams fastest).
    Lines(*const f32),
    /// Nothing.
    Nothing,
}

impl BPanel<'_> {
    /// True when rows 0..kc hold `cols` readable columns each, in strips of `nr`.
    fn fits(&self, kc: usize, cols: usize, nr: usize) -> bool {
        let last_strip = cols.saturating_sub(1) / nr;
        kc == 0
            || cols == 0
            || last_strip * self.step + (kc - 1) * self.ld + (cols - last_strip * nr)
                <= self.data.len()
    }
}

/// One tile, after checking every bound the micro-kernel relies on;
/// dispatches to the version specialised for its number of real rows, so a
/// short tile (one token while generating, an expert with few tokens) costs
/// only the rows it has. `add`: continue from C's values.
#[inline(always)]
fn tile_checked<S: Simd>(
    s: S,
    c: &mut MatMut<'_>,
    tile: Tile,
    kc: usize,
    a: Mat<'_>,
    b: BPanel<'_>,
    add: bool,
) {
    let nr = 16 * S::TILE_VECS;
    assert!(
        tile.rows <= S::TILE_ROWS
            && (!b.packed || tile.cols <= nr)
            && tile.fits(c.rows, c.cols, a, kc)
            && b.fits(kc, if b.packed { nr } else { tile.cols }, nr)
    );
    let (ldc, c) = (c.row_stride, c.as_mut_ptr());
    macro_rules! rows {
        ($($r:literal)*) => {
            match (tile.rows, S::TILE_VECS) {
                $(($r, 1) => tile_rows::<S, $r, 1>(s, c, ldc, tile, kc, a, b, add),)*
                $(($r, _) => tile_rows::<S, $r, 2>(s, c, ldc, tile, kc, a, b, add),)*
                _ => unreachable!("tiles have 1 to 8 rows"),
            }
        };
    }
    // SAFETY: the tile's rows and columns lie inside C, its rows over kc
    // depth inside `a`, and its kc rows of `tile.cols` columns inside B (asserted just
    // above; the views were bounds-checked on construction).
    unsafe { rows!(1 2 3 4 5 6 7 8) }
}

/// The micro-kernel: the tile's R × (16·NV) accumulators in R·NV vectors,
/// strip by strip of B:
///   acc ← C tile (when adding) or 0;  for p: acc[r] ← fma(a[r, p], B[p, strip], acc[r])
/// (`a`: the tile's rows of A from the depth block's start.)
/// A zero-padded packed panel is read whole and B read in place through lane
/// masks of the strip's real columns ([`depth_loop`]): the same tile either way.
///
/// # Safety
/// `b` satisfies [`BPanel::fits`] for `kc` rows of `tile.cols` columns (of
/// NR columns, all of them read, when `b.packed`); `tile` has `R` rows and satisfies [`Tile::fits`] for C (row stride `ldc`,
/// at `c`, valid for reads and writes) and for `a` over `kc` depth.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows<S: Simd, const R: usize, const NV: usize>(
    s: S,
    c: *mut f32,
    ldc: usize,
    tile: Tile,
    kc: usize,
    a: Mat<'_>,
    b: BPanel<'_>,
    add: bool,
) {
    let nr = 16 * NV;
    let rows: [*const f32; R] = array_of(
        #[inline(always)]
        |r| a.data[r * a.row_stride..].as_ptr(),
    );
    for (strip, first) in (0..tile.cols).step_by(nr).enumerate() {
        // Real columns of each of the strip's vectors.
        let real: [usize; NV] = array_of(
            #[inline(always)]
            |j| (tile.cols - first).saturating_sub(16 * j).min(16),
        );
        let c_col = c.wrapping_add(tile.col + first);
        let c_row = |r: usize| c_col.wrapping_add((tile.row + r) * ldc);
        let mut acc = [[s.zero(); NV]; R];
        if add {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                for (j, v) in acc_r.iter_mut().enumerate() {
                    // SAFETY: row tile.row + r, this strip's real columns of
                    // vector j, lie inside C (caller's contract).
                    *v = unsafe { load_cols(s, c_row(r).wrapping_add(16 * j), real[j]) };
                }
            }
        }
        let b_strip = b.data.as_ptr().wrapping_add(strip * b.step);
        let ahead = match b.ahead {
            Ahead::NextStrip => Some((b_strip.wrapping_add(b.step), b.ld)),
            Ahead::Lines(first) => Some((first.wrapping_add(strip * kc * nr), nr)),
            Ahead::Nothing => None,
        };
        let (a_step, b_rows) = (a.col_stride, (b_strip, b.ld));
        // SAFETY: BPanel::fits and Tile::fits (the caller's contract) cover
        // every read of depth_loop: kc rows of this strip, R rows of A.
        unsafe {
            if b.packed {
                depth_loop::<S, R, NV, true>(s, &mut acc, rows, a_step, b_rows, ahead, kc, real);
            } else {
                depth_loop::<S, R, NV, false>(s, &mut acc, rows, a_step, b_rows, ahead, kc, real);
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (j, &v) in acc_r.iter().enumerate() {
                // SAFETY: as for the loads of C above.
                unsafe { store_cols(s, c_row(r).wrapping_add(16 * j), real[j], v) };
            }
        }
    }
}

/// The micro-kernel's inner loop over one depth block:
///   for p in 0..kc:  acc[r][j] ← fma(A[row r, p], B[p, vector j], acc[r][j])
/// `PACKED`: B is a zero-padded panel, read whole (padding lanes are zeros,
/// as the masked loads of B read in place would give); otherwise B is read
/// in place, through masks of each vector's `real` columns. Two
/// loops, not one with a branch per load: the branches cost as much as the
/// FMAs they guard on AVX2.
///
/// # Safety
/// For p < kc: `rows[r] + p·a_step` is readable (A), and `b + p·ld + 16·j`
/// holds 16 readable floats per vector j when `PACKED`, `real[j]` otherwise.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn depth_loop<S: Simd, const R: usize, const NV: usize, const PACKED: bool>(
    s: S,
    acc: &mut [[S::V; NV]; R],
    rows: [*const f32; R],
    a_step: usize,
    (b, ld): (*const f32, usize),
    ahead: Option<(*const f32, usize)>,
    kc: usize,
    real: [usize; NV],
) {
    let mut b_row = b;
    for p in 0..kc {
        if let Some((first, stride)) = ahead {
            let line = first.wrapping_add(p * stride);
            for j in 0..NV {
                s.prefetch(line.wrapping_add(16 * j));
            }
        }
        // SAFETY: p < kc, so B's row p and A[row, p] are readable (the
        // caller's contract).
        unsafe {
            let bv: [S::V; NV] = array_of(
                #[inline(always)]
                |j| {
                    if PACKED {
                        s.load(b_row.add(16 * j))
                    } else {
                        load_cols(s, b_row.wrapping_add(16 * j), real[j])
                    }
                },
            );
            for (row, acc_r) in rows.iter().zip(acc.iter_mut()) {
                let a_r = s.splat(*row.add(p * a_step));
                for (acc, &bv) in acc_r.iter_mut().zip(&bv) {
                    *acc = s.mul_add(a_r, bv, *acc);
                }
            }
        }
        b_row = b_row.wrapping_add(ld);
    }
}

/// The first `n` (≤ 16) floats at `p` as a vector, zeros past them.
///
/// # Safety
/// `n` floats must be readable at `p`.
#[inline(always)]
unsafe fn load_cols<S: Simd>(s: S, p: *const f32, n: usize) -> S::V {
    // SAFETY: the caller's contract.
    unsafe {
        match n {
            16 => s.load(p),
            0 => s.zero(),
            _ => s.load_first(p, n),
        }
    }
}

/// Writes the first `n` (≤ 16) lanes of `v` to `p`.
///
/// # Safety
/// `n` floats must be writable at `p`.
#[inline(always)]
unsafe fn store_cols<S: Simd>(s: S, p: *mut f32, n: usize, v: S::V) {
    // SAFETY: the caller's contract.
    unsafe {
        match n {
            16 => s.store(p, v),
            0 => {}
            _ => s.store_first(p, n, v),
        }
    }
}
