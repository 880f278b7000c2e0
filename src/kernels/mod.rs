//! Low-level numeric kernels: the only module with `unsafe`.
//!
//! Everything the model does is built from these: a strided matrix multiply
//! ([`matmul`], our own blocked GEMM) and the fused vector kernels of
//! [`vector`] (softmax, cross-entropy, SwiGLU, RMSNorm, AdamW, …). Each kernel
//! is written once over the 16-lane SIMD vocabulary of `simd` (AVX-512, AVX2,
//! NEON and a scalar level, one small file each), states its formula and has
//! a scalar reference version the tests compare against; the model code above
//! never touches raw pointers or intrinsics.

mod alloc;
mod gemm;
mod outer;
mod pages;
mod probe;
mod simd;
mod threads;
mod update;
pub mod vector;

pub use alloc::{CountingAllocator, allocated_bytes, allocation_count};
pub use outer::{Outer, outer_sq_norm, try_for_each_outer_block};
pub use pages::{Buffer, Stream, zeroed};
pub use probe::{fma_peak_gflops, sqrt_div_seconds};
pub use simd::{
    SimdLevel, SimdLevelError, cpu_model, describe as describe_simd, requested_level, simd_level,
};
pub use threads::{MAX_THREADS, set_threads, threads};
pub use update::{TensorGrad, TensorStep, adamw_tensors};

pub use vector::{
    AdamWStep, adamw, add_assign, axpy, cross_entropy_rows, dot, rmsnorm, rmsnorm_backward,
    scaled_softmax_in_place, sigmoid, softmax_in_place, sum_of_squares, swiglu_backward,
    swiglu_forward,
};

use gemm::Path;
use simd::Token;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A read-only matrix view: element (i, j) is `data[i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A contiguous row-major `[rows, cols]` matrix at the start of `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// A row-major `[rows, cols]` matrix whose rows are `row_stride` apart.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        let m = Mat {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        };
        assert!(
            m.fits(data.len()),
            "matrix [{rows}, {cols}] with row stride {row_stride} exceeds a buffer of {}",
            data.len()
        );
        m
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows r0..r0+n of this view.
    fn row_block(self, r0: usize, n: usize) -> Self {
        let start = (r0 * self.row_stride).min(self.data.len());
        Mat {
            data: &self.data[start..],
            rows: n,
            ..self
        }
    }

    /// Columns c0..c0+n of this view.
    fn col_block(self, c0: usize, n: usize) -> Self {
        let start = (c0 * self.col_stride).min(self.data.len());
        Mat {
            data: &self.data[start..],
            cols: n,
            ..self
        }
    }

    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < len
    }
}

/// A writable row-major matrix view: element (i, j) is at `i·row_stride + j`
/// from its start. A view owns exactly its elements (rows 0..rows, columns
/// 0..cols), not the gaps between rows, so it can be split by rows or by
/// columns into views that never share an element (the parts of one product
/// that threads compute side by side).
#[derive(Debug)]
pub struct MatMut<'a> {
    /// First element. Valid for reads and writes of every element of the view.
    ptr: NonNull<f32>,
    rows: usize,
    cols: usize,
    row_stride: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: a MatMut is an exclusive borrow of its elements, like `&mut [f32]`,
// which is Send; no two live views share an element.
unsafe impl Send for MatMut<'_> {}

impl<'a> MatMut<'a> {
    /// A contiguous row-major `[rows, cols]` matrix at the start of `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// A row-major `[rows, cols]` matrix whose rows are `row_stride ≥ cols` apart.
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(row_stride >= cols, "rows of a MatMut must not overlap");
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * row_stride + cols <= data.len(),
            "matrix [{rows}, {cols}] with row stride {row_stride} exceeds a buffer of {}",
            data.len()
        );
        MatMut {
            ptr: NonNull::from(data).cast(),
            rows,
            cols,
            row_stride,
            _borrow: PhantomData,
        }
    }

    /// Row r (its `cols` elements).
    fn row_mut(&mut self, r: usize) -> &mut [f32] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        // SAFETY: row r's `cols` elements belong to this view (r < rows), which
        // borrows them exclusively for 'a; `&mut self` keeps this slice the
        // only access while it lives.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(r * self.row_stride), self.cols)
        }
    }

    /// The first element, for the micro-kernels (valid for the view's elements only).
    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.ptr.as_ptr()
    }

    /// Splits into rows 0..r and rows r.. (two views that share no element).
    fn split_rows(self, r: usize) -> (MatMut<'a>, MatMut<'a>) {
        assert!(r <= self.rows);
        let at = if r < self.rows {
            r * self.row_stride
        } else {
            0
        };
        // SAFETY: row r (when it exists) is inside the view; the two parts
        // own disjoint rows.
        let bottom = unsafe { self.ptr.add(at) };
        let top = MatMut { rows: r, ..self };
        let bottom = MatMut {
            ptr: bottom,
            rows: self.rows - r,
            ..self
        };
        (top, bottom)
    }

    /// Splits into columns 0..c and columns c.. (two views that share no element).
    fn split_cols(self, c: usize) -> (MatMut<'a>, MatMut<'a>) {
        assert!(c <= self.cols);
        let at = if c < self.cols { c } else { 0 };
        // SAFETY: column c (when it exists) is inside the view; the two parts
        // own disjoint columns of the same rows.
        let right = unsafe { self.ptr.add(at) };
        let left = MatMut { cols: c, ..self };
        let right = MatMut {
            ptr: right,
            cols: self.cols - c,
            ..self
        };
        (left, right)
    }
}

/// Whether a matrix multiply overwrites or adds to its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// C = A·B
    Overwrite,
    /// C += A·B
    Accumulate,
}

/// C (=|+=) A·B for C [m, n], A [m, k], B [k, n]; any of them may be a
/// transposed or strided view. Shapes must agree (a programming error if not).
pub fn matmul(c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, write: Write) {
    matmul_with(c, a, b, write, simd::active());
}

/// A weight W [out, in] packed once for products x·Wᵀ (see [`pack_weight`]).
#[derive(Debug, Clone, Copy)]
pub struct PackedWeight<'a> {
    data: &'a [f32],
    out: usize,
    inp: usize,
}

impl<'a> PackedWeight<'a> {
    /// A packed weight of `out` rows and `inp` columns held in `data`.
    pub fn new(data: &'a [f32], out: usize, inp: usize) -> Self {
        assert_eq!(
            data.len(),
            packed_weight_len(out, inp),
            "packed weight length"
        );
        PackedWeight { data, out, inp }
    }
}

/// Floats needed to hold W [out, in] packed.
pub fn packed_weight_len(out: usize, inp: usize) -> usize {
    gemm::packed_len(out, inp)
}

/// Packs W [out, in] (row-major) into `dst` in the panel layout the matrix
/// multiply uses for x·Wᵀ, so that repeated products skip packing. A product
/// through [`matmul_packed`] equals [`matmul`] with `Mat::new(w, out, inp).t()`
/// to the bit.
pub fn pack_weight(dst: &mut [f32], w: &[f32], out: usize, inp: usize) {
    assert_eq!(
        dst.len(),
        packed_weight_len(out, inp),
        "packed weight length"
    );
    gemm::pack_weight(dst, Mat::new(w, out, inp).t(), simd::active());
}

/// C [m, out] (=|+=) A [m, in] · Wᵀ with W packed by [`pack_weight`].
pub fn matmul_packed(c: MatMut<'_>, a: Mat<'_>, w: PackedWeight<'_>, write: Write) {
    assert!(
        a.rows == c.rows && a.cols == w.inp && c.cols == w.out,
        "matmul_packed shapes: C [{}, {}] = A [{}, {}] · Wᵀ [{}, {}]",
        c.rows,
        c.cols,
        a.rows,
        a.cols,
        w.inp,
        w.out
    );
    if c.rows == 0 || c.cols == 0 || a.cols == 0 {
        return matmul(c, a, Mat::new(&[], w.inp, w.out), write);
    }
    let token = simd::active();
    let accumulate = write == Write::Accumulate;
    by_blocks(c, a, w.inp * w.out, token, &|c, a, first_col| {
        gemm::gemm_prepacked(c, a, (w.data, w.out, first_col), accumulate, token)
    });
}

/// [`matmul`] at an explicit SIMD level (tests compare them).
fn matmul_with(c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, write: Write, token: Token) {
    assert!(
        a.rows == c.rows && b.cols == c.cols && a.cols == b.rows,
        "matmul shapes: C [{}, {}] = A [{}, {}] · B [{}, {}]",
        c.rows,
        c.cols,
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    let (m, n, k) = (c.rows, c.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if write == Write::Overwrite {
            let mut c = c;
            for r in 0..m {
                c.row_mut(r).fill(0.0);
            }
        }
        return;
    }
    let accumulate = write == Write::Accumulate;
    let path = Path::choose(m, k, b);
    by_blocks(c, a, k * n, token, &|c, a, first_col| {
        let cols = c.cols;
        gemm::gemm(c, a, b.col_block(first_col, cols), accumulate, token, path)
    });
}

/// Multiply-adds below which a product stays on one thread: handing a part to
/// a helper costs about a microsecond.
const PARALLEL_MIN_WORK: usize = 1 << 17;

/// Runs `product(piece of C, its rows of A, its first column)` on pieces of
/// C, claimed by the intra-op threads, when threads are on and the product
/// has at least [`PARALLEL_MIN_WORK`] multiply-adds (`k_times_n` per row).
/// One piece per thread. Wide products (four NR panels or more per thread)
/// split C's columns with B's, or B's packed panels, so each thread streams
/// its own share of the weight — split by rows, every thread would read all
/// of it (the small model's forward on two threads took 0.87× the time with
/// wide products cut by columns). Products with at least as many rows as
/// columns (thousands of tokens) split rows all the same: then each thread
/// packs B whole but only its own rows of A, the larger operand.
/// Narrower products split C's rows (with
/// A's) in whole MR-row tiles when there are at least two tiles per thread,
/// and otherwise — few tokens on a narrow weight — columns again. (Four
/// column pieces per thread, to let a slowed thread take fewer, were slower:
/// dX = dy·W then reads each row of W in short segments.) Every element is
/// computed by the same arithmetic in the same order as on one thread, so
/// every bit of the result is the same.
fn by_blocks(
    c: MatMut<'_>,
    a: Mat<'_>,
    k_times_n: usize,
    token: Token,
    product: &(dyn Fn(MatMut<'_>, Mat<'_>, usize) + Sync),
) {
    let threads = threads();
    if threads <= 1 || c.rows * k_times_n < PARALLEL_MIN_WORK {
        return product(c, a, 0);
    }
    let (mr, nr) = gemm::tile_shape(token);
    let tiles = c.rows.div_ceil(mr);
    let (wide, tall) = (c.cols >= 4 * nr * threads, tiles / 2 >= threads);
    if (wide && !(tall && c.rows >= c.cols)) || (!tall && c.cols >= 2 * nr) {
        let (cols, size) = (c.cols, c.cols.div_ceil(threads).next_multiple_of(nr));
        threads::for_each_claimed(pieces(c, cols, size, MatMut::split_cols), &|(c, first)| {
            product(c, a, first)
        });
    } else if tall {
        let (rows, size) = (c.rows, tiles.div_ceil(threads) * mr);
        threads::for_each_claimed(pieces(c, rows, size, MatMut::split_rows), &|(c, first)| {
            let rows = c.rows;
            product(c, a.row_block(first, rows), 0)
        });
    } else {
        product(c, a, 0)
    }
}

/// `c` cut by `cut` (into rows or columns) into pieces of `size` of its
/// `total`, each with its first row or column.
fn pieces<'a>(
    c: MatMut<'a>,
    total: usize,
    size: usize,
    cut: fn(MatMut<'a>, usize) -> (MatMut<'a>, MatMut<'a>),
) -> impl ExactSizeIterator<Item = (MatMut<'a>, usize)> + Send {
    let mut rest = Some(c);
    (0..total.div_ceil(size)).map(move |i| {
        let first = i * size;
        let (piece, tail) = cut(
            rest.take().expect("one piece per step"),
            size.min(total - first),
        );
        rest = Some(tail);
        (piece, first)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook triple loop every optimised path is compared against.
    fn naive(a: Mat, b: Mat) -> Vec<f32> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0.0f64;
                for p in 0..a.cols {
                    s += a.data[i * a.row_stride + p * a.col_stride] as f64
                        * b.data[p * b.row_stride + j * b.col_stride] as f64;
                }
                c[i * b.cols + j] = s as f32;
            }
        }
        c
    }

    /// Deterministic test values in [−1, 1).
    pub(super) fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    fn kernels() -> Vec<Token> {
        Token::all()
    }

    fn check_close(got: &[f32], want: &[f32], what: &str) {
        for (i, (x, y)) in got.iter().zip(want).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn matmul_matches_naive_for_all_transposes_and_edge_sizes() {
        // Sizes straddle the tile (8 × 32), depth-block (128, 256) and
        // A-block (144 rows: 301 = 144 + 144 + 13) edges, and both
        // sides of the swap to Cᵀ = Bᵀ·Aᵀ (taken when B is transposed and m ≤ min(n, 256));
        // 16 rows fill a weight-rows tile (all 16 lanes of Aᵀ packed); a wide B
        // read in place comes in depth blocks of 16 and row tiles of 5 + 5.
        let shapes = [
            (1, 5, 3),
            (7, 13, 5),
            (8, 64, 32),
            (13, 129, 33),
            (150, 70, 600),
            (2, 300, 40),
            (16, 300, 17),
            (10, 100, 1030),
            (301, 290, 70),
        ];
        for kernel in kernels() {
            for &(m, k, n) in &shapes {
                let a = data(m * k, 1);
                let b = data(k * n, 2);
                let cases = [
                    (Mat::new(&a, m, k), Mat::new(&b, k, n)),
                    (Mat::new(&a, k, m).t(), Mat::new(&b, k, n)),
                    (Mat::new(&a, m, k), Mat::new(&b, n, k).t()),
                    (Mat::new(&a, k, m).t(), Mat::new(&b, n, k).t()),
                ];
                for (case, (am, bm)) in cases.into_iter().enumerate() {
                    let what = format!("{} {m}x{k}x{n} case {case}", kernel.level());
                    let want = naive(am, bm);
                    let mut c = vec![0.5; m * n];
                    matmul_with(MatMut::new(&mut c, m, n), am, bm, Write::Overwrite, kernel);
                    check_close(&c, &want, &what);
                    matmul_with(MatMut::new(&mut c, m, n), am, bm, Write::Accumulate, kernel);
                    let twice: Vec<f32> = want.iter().map(|w| 2.0 * w).collect();
                    check_close(&c, &twice, &what);
                }
            }
        }
    }

    #[test]
    fn matmul_gives_the_same_bits_at_every_level() {
        // Every element is one fused multiply-add chain over the whole depth in
        // index order, whatever the tile shape (8 × 32 on AVX-512, 6 × 16 on
        // AVX2 and NEON, 4 × 16 scalar), path or depth blocking — and AVX2's
        // paired weight-rows tile (≤ 8 tokens, two rows of W per vector:
        // 7x13x5 and 3x600x100 with B = Wᵀ) against scalar's one-row tile.
        for &(m, k, n) in &[
            (7, 13, 5),
            (13, 300, 33),
            (150, 70, 600),
            (16, 300, 17),
            (3, 600, 100),
            (10, 100, 1030),
            (301, 290, 70),
        ] {
            let a = data(m * k, 3);
            let b = data(k * n, 4);
            let cases = [
                (Mat::new(&a, m, k), Mat::new(&b, k, n)),
                (Mat::new(&a, k, m).t(), Mat::new(&b, k, n)),
                (Mat::new(&a, m, k), Mat::new(&b, n, k).t()),
                (Mat::new(&a, k, m).t(), Mat::new(&b, n, k).t()),
            ];
            for (case, (am, bm)) in cases.into_iter().enumerate() {
                let product = |token: Token| {
                    let mut c = data(m * n, 5);
                    matmul_with(MatMut::new(&mut c, m, n), am, bm, Write::Accumulate, token);
                    c.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
                };
                let want = product(Token::Scalar(simd::Scalar));
                for token in kernels() {
                    assert!(
                        product(token) == want,
                        "{} {m}x{k}x{n} case {case} differs from scalar",
                        token.level()
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_agrees_with_the_gemm_crate_on_model_shapes() {
        // The `gemm` crate is a proven reference; shapes are the tiny and small
        // models' (tokens × in × out), in the y = x·Wᵀ form the model uses.
        for &(m, k, n) in &[(64, 64, 96), (32, 64, 512), (29, 256, 64), (64, 256, 1000)] {
            let x = data(m * k, 7);
            let w = data(n * k, 8);
            let mut ours = vec![0.0; m * n];
            matmul(
                MatMut::new(&mut ours, m, n),
                Mat::new(&x, m, k),
                Mat::new(&w, n, k).t(),
                Write::Overwrite,
            );
            let mut theirs = vec![0.0; m * n];
            // SAFETY: all three buffers hold exactly the m×k, n×k and m×n elements addressed.
            unsafe {
                gemm_crate::gemm(
                    m,
                    n,
                    k,
                    theirs.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm_crate::Parallelism::None,
                );
            }
            check_close(&ours, &theirs, &format!("{m}x{k}x{n}"));
        }
    }

    #[test]
    fn prepacked_weights_give_the_same_product_to_the_bit() {
        for &(m, inp, out) in &[(5, 64, 96), (64, 300, 40), (3, 600, 1000)] {
            let x = data(m * inp, 1);
            let w = data(out * inp, 2);
            let mut packed = vec![0.0; packed_weight_len(out, inp)];
            pack_weight(&mut packed, &w, out, inp);
            let (mut a, mut b) = (vec![0.25; m * out], vec![0.25; m * out]);
            for write in [Write::Overwrite, Write::Accumulate] {
                matmul(
                    MatMut::new(&mut a, m, out),
                    Mat::new(&x, m, inp),
                    Mat::new(&w, out, inp).t(),
                    write,
                );
                let pw = PackedWeight::new(&packed, out, inp);
                matmul_packed(MatMut::new(&mut b, m, out), Mat::new(&x, m, inp), pw, write);
                assert!(
                    a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{m}x{inp}x{out}"
                );
            }
        }
    }

    #[test]
    fn strided_views_address_the_right_elements() {
        // A [3, 2] matrix living in the first two columns of a [3, 4] buffer.
        let buf = [1.0, 2.0, 9.0, 9.0, 3.0, 4.0, 9.0, 9.0, 5.0, 6.0, 9.0, 9.0];
        let a = Mat::strided(&buf, 3, 2, 4);
        let id = [1.0, 0.0, 0.0, 1.0];
        let mut c = [0.0; 12];
        matmul(
            MatMut::strided(&mut c, 3, 2, 4),
            a,
            Mat::new(&id, 2, 2),
            Write::Overwrite,
        );
        assert_eq!(
            c,
            [1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0]
        );
    }

    #[test]
    #[should_panic(expected = "exceeds a buffer")]
    fn views_refuse_out_of_bounds_shapes() {
        let buf = [0.0; 5];
        let _ = Mat::new(&buf, 2, 3);
    }
}
