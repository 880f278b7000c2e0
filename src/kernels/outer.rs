//! Weight gradients that never reach memory.
//!
//! The gradient of a linear layer's weight is an outer product over tokens,
//!   dW [out, in] = dyᵀ · x,   dy [T, out], x [T, in],
//! and with few tokens its two factors are tiny next to dW itself. Training
//! then keeps only the factors: [`outer_sq_norm`] gives ‖dW‖² (for global-norm
//! clipping) from two T × T Gram matrices, and [`with_block`] forms dW a block
//! of rows at a time, in cache, for AdamW to use at once (see
//! [`super::adamw_tensors`]) — so dW is never written out, read back, or
//! summed over in a separate pass.

use std::cell::RefCell;
use std::ops::Range;

use super::gemm::{self, Path};
use super::simd::{self, Token};
use super::vector;
use super::{Buffer, Mat, MatMut, Stream};

/// Floats of dW formed at a time: 64 KB, consumed from L2 as soon as it is
/// made (in quiet runs of `scale_train_256`, 8–32 KB blocks were slower and
/// 128–256 KB ones no faster).
const BLOCK_FLOATS: usize = 16384;

thread_local! {
    /// This thread's block of dW rows (grown once to the largest block it
    /// met), in the gradients' quarter of a page (see [`Buffer`]).
    static BLOCK: RefCell<Option<Buffer>> = const { RefCell::new(None) };
}

/// Rows of dW per block for an input width `inp`: whole micro-kernel tiles, about 64 KB.
pub(super) fn block_rows(inp: usize) -> usize {
    (BLOCK_FLOATS / inp.max(1) / gemm::MR_MAX).max(1) * gemm::MR_MAX
}

/// ‖dyᵀ·x‖²_F = Σ_s Σ_t (dy_s·dy_t)(x_s·x_t), from the Gram matrices of the
/// token rows of dy [T, out] and x [T, in] (both row-major); T²/2 · (out + in)
/// multiply-adds instead of T · out · in, and nothing written. The Gram
/// matrices are taken a 4 × 4 block at a time ([`vector::dots_4x4`]: a dot
/// per entry cost about 90 cycles of set-up and reduction for a 64-float
/// row), their products summed in f64; a block below the diagonal counts
/// twice (G is symmetric).
pub fn outer_sq_norm(product: Outer<'_>) -> f64 {
    let Outer { dy, x, .. } = product;
    let tokens = dy.rows;
    let mut sum = 0.0f64;
    for s0 in (0..tokens).step_by(4) {
        for t0 in (0..=s0).step_by(4) {
            let gy = vector::dots_4x4(four_rows(dy, s0), four_rows(dy, t0));
            let gx = vector::dots_4x4(four_rows(x, s0), four_rows(x, t0));
            let real = |k: usize| s0 + k / 4 < tokens && t0 + k % 4 < tokens;
            let block: f64 = (0..16)
                .filter(|&k| real(k))
                .map(|k| f64::from(gy[k]) * f64::from(gx[k]))
                .sum();
            sum += if s0 == t0 { block } else { 2.0 * block };
        }
    }
    // Rounding can leave a hair below zero when dW ≈ 0.
    sum.max(0.0)
}

/// Rows t0 .. t0 + 4 of a row-major view, the last real row standing in
/// for those past its end (their dots are not counted).
fn four_rows(m: Mat<'_>, t0: usize) -> [&[f32]; 4] {
    std::array::from_fn(|k| row(m, (t0 + k).min(m.rows - 1)))
}

/// Row t of a row-major view.
fn row<'a>(m: Mat<'a>, t: usize) -> &'a [f32] {
    &m.data[t * m.row_stride..t * m.row_stride + m.cols]
}

/// The product dW = dyᵀ·x whose rows [`with_block`] forms, or a band of
/// its rows ([`Outer::rows`]: one tensor of a stacked weight, as `q_proj` of
/// `q|k|v`).
#[derive(Debug, Clone, Copy)]
pub struct Outer<'a> {
    /// dy [T, out] (the band's columns of it).
    dy: Mat<'a>,
    /// x [T, in].
    x: Mat<'a>,
    /// Rows of the whole product, which fix how every band is computed.
    whole_rows: usize,
}

impl<'a> Outer<'a> {
    /// dW = dyᵀ·x for dy [T, out] and x [T, in], both row-major.
    pub fn new(dy: Mat<'a>, x: Mat<'a>) -> Self {
        assert!(dy.rows == x.rows && dy.col_stride == 1 && x.col_stride == 1);
        Outer {
            dy,
            x,
            whole_rows: dy.cols,
        }
    }

    /// Rows r0..r0+n of this product, as a product of their own.
    pub fn rows(self, r0: usize, n: usize) -> Self {
        assert!(r0 + n <= self.dy.cols);
        Outer {
            dy: self.dy.col_block(r0, n),
            ..self
        }
    }

    /// Rows of dW (the width of dy).
    pub fn out_rows(&self) -> usize {
        self.dy.cols
    }

    /// Columns of dW (the width of x): row r of dW starts at r·x_width().
    pub fn x_width(&self) -> usize {
        self.x.cols
    }

    /// The micro-kernel and blocking the whole product would use as one
    /// [`super::matmul`]: every block takes the same path, so its rows are
    /// the whole product's rows to the bit.
    pub(super) fn plan(&self) -> (Token, Path) {
        (
            simd::active(),
            Path::choose(self.whole_rows, self.dy.rows, self.x),
        )
    }
}

/// Rows r0 .. r0 + dst.len()/in of dW = dyᵀ·x into `dst` (row-major), the
/// same bits as those rows of `matmul(dW, dyᵀ, x)`. With T = 0, dW = 0.
fn rows_on(dst: &mut [f32], product: Outer<'_>, r0: usize, (token, path): (Token, Path)) {
    let Outer { dy, x, .. } = product;
    let rows = dst.len() / x.cols;
    assert!(dst.len() == rows * x.cols && r0 + rows <= dy.cols && dy.rows == x.rows);
    if dy.rows == 0 {
        dst.fill(0.0);
        return;
    }
    let c = MatMut::new(dst, rows, x.cols);
    gemm::gemm(c, dy.t().row_block(r0, rows), x, false, token, path);
}

/// Forms rows r0 .. r0 + rows of dW in this thread's block buffer and
/// returns `f` of them.
pub(super) fn with_block<R>(
    product: Outer<'_>,
    plan: (Token, Path),
    r0: usize,
    rows: usize,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    let len = rows * product.x.cols;
    BLOCK.with_borrow_mut(|block| {
        if block.as_ref().is_none_or(|g| g.len() < len) {
            // A whole block of this product (no block is longer).
            let whole = block_rows(product.x.cols) * product.x.cols;
            *block = Some(Buffer::zeroed(whole, Stream::Gradients));
        }
        let g = &mut block.as_mut().expect("just made")[..len];
        rows_on(g, product, r0, plan);
        f(g)
    })
}

/// Forms rows `rows` of dW block by block ([`block_rows`] at a time) in this
/// thread's cache and calls `f(first row of the block, block)` on each, in
/// order, stopping at the first error.
fn try_blocks<E>(
    product: Outer<'_>,
    rows: Range<usize>,
    mut f: impl FnMut(usize, &[f32]) -> Result<(), E>,
) -> Result<(), E> {
    let (plan, step) = (product.plan(), block_rows(product.x.cols));
    for r0 in rows.clone().step_by(step) {
        with_block(product, plan, r0, step.min(rows.end - r0), |g| f(r0, g))?;
    }
    Ok(())
}

/// Calls `f(first row, block)` for every block of rows of dW = dyᵀ·x, in
/// order, formed as [`super::adamw_tensors`] forms them (the same bits as the whole
/// product's rows); stops at the first error.
pub fn try_for_each_outer_block<E>(
    product: Outer<'_>,
    f: impl FnMut(usize, &[f32]) -> Result<(), E>,
) -> Result<(), E> {
    try_blocks(product, 0..product.dy.cols, f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::data;
    use crate::kernels::{Write, matmul};

    fn whole(dy: Mat<'_>, x: Mat<'_>) -> Vec<f32> {
        let mut dw = vec![0.0; dy.cols * x.cols];
        matmul(
            MatMut::new(&mut dw, dy.cols, x.cols),
            dy.t(),
            x,
            Write::Overwrite,
        );
        dw
    }

    #[test]
    fn gram_norm_equals_the_sum_of_squares_of_the_product() {
        for &(t, out, inp) in &[(1, 5, 3), (8, 300, 40), (16, 64, 64), (33, 17, 130)] {
            let (a, b) = (data(t * out, 1), data(t * inp, 2));
            let (dy, x) = (Mat::new(&a, t, out), Mat::new(&b, t, inp));
            let want = vector::sum_of_squares(&whole(dy, x));
            let got = outer_sq_norm(Outer::new(dy, x));
            assert!(
                (got - want).abs() <= 1e-5 * want,
                "{t}x{out}x{inp}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn blocks_of_rows_are_the_whole_products_rows_to_the_bit() {
        for &(t, out, inp) in &[(8, 300, 40), (16, 2048, 256), (40, 72, 64), (0, 16, 8)] {
            let (a, b) = (data(t * out, 3), data(t * inp, 4));
            let product = Outer::new(Mat::new(&a, t, out), Mat::new(&b, t, inp));
            let want = whole(product.dy, product.x);
            // The whole product, and a band of rows (one tensor of a stacked weight).
            let band = (out / 3..out / 3 + out / 2, product.rows(out / 3, out / 2));
            for (rows, part) in [(0..out, product), band] {
                let mut next = rows.start;
                let seen: Result<(), String> = try_for_each_outer_block(part, |r0, g| {
                    let r0 = rows.start + r0;
                    let same = g
                        .iter()
                        .zip(&want[r0 * inp..])
                        .all(|(p, q)| p.to_bits() == q.to_bits());
                    if r0 != next || !same {
                        return Err(format!("{t}x{out}x{inp} block at row {r0}"));
                    }
                    next = r0 + g.len() / inp;
                    Ok(())
                });
                seen.unwrap();
                assert_eq!(next, rows.end);
            }
        }
    }
}
