//! Our matrix multiply against the `gemm` and `matrixmultiply` crates on
//! the model's shapes, one thread, in the three layouts a linear layer's
//! training step multiplies in (x [T, in], W [out, in], dy [T, out]):
//!
//!   forward  y  = x·Wᵀ     A row-major, B = Wᵀ (a transposed view)
//!   dX       dx = dy·W     A row-major, B row-major
//!   dW       dW = dyᵀ·x    A = dyᵀ (a transposed view), B row-major
//!
//! Each figure is the fastest of 9 timings of many calls: on a shared
//! virtual machine whose speed changes every few hundred milliseconds the
//! fastest run is the one least disturbed (the median is printed beside it).
//!
//!     taskset -c 1 cargo run --release --example gemm_compare

use std::time::Instant;

use rosetta_moe::kernels::{Mat, MatMut, Write, matmul};

/// How a linear layer's product lays out its operands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Forward,
    Dx,
    Dw,
}

/// A matrix operand: its buffer, shape [rows, cols] and strides.
struct Operand {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Operand {
    /// A [rows, cols] operand; `transposed`: stored as its transpose, row-major.
    fn new(rows: usize, cols: usize, transposed: bool, seed: usize) -> Self {
        let data = (0..rows * cols)
            .map(|i| ((i + seed) % 7) as f32 * 0.1)
            .collect();
        let (row_stride, col_stride) = if transposed { (1, rows) } else { (cols, 1) };
        Operand {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    fn view(&self) -> Mat<'_> {
        if self.col_stride == 1 {
            Mat::new(&self.data, self.rows, self.cols)
        } else {
            Mat::new(&self.data, self.cols, self.rows).t()
        }
    }
}

/// (fastest, median) seconds per call of `f`.
fn time(iters: usize, f: &mut dyn FnMut()) -> (f64, f64) {
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() / iters as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[0], times[4])
}

/// C [m, n] = A [m, k] · B [k, n] in `layout`, by each library.
fn bench(name: &str, layout: Layout, (m, k, n): (usize, usize, usize)) {
    let a = Operand::new(m, k, layout == Layout::Dw, 1);
    let b = Operand::new(k, n, layout == Layout::Forward, 2);
    let mut c = vec![0.0f32; m * n];
    let flops = 2.0 * (m * k * n) as f64;
    let iters = ((2e9 / flops) as usize).clamp(5, 200_000);
    let ours = time(iters, &mut || {
        matmul(
            MatMut::new(&mut c, m, n),
            a.view(),
            b.view(),
            Write::Overwrite,
        )
    });
    // SAFETY: every pointer and stride describes the buffers above, which
    // hold m·k, k·n and m·n floats.
    let gemm = time(iters, &mut || unsafe {
        gemm_crate::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm_crate::Parallelism::None,
        )
    });
    // SAFETY: as above.
    let mm = time(iters, &mut || unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    });
    let gf = |(best, median): (f64, f64)| {
        format!(
            "{:8.2} µs {:5.1} GF/s (median {:5.1})",
            best * 1e6,
            flops / best / 1e9,
            flops / median / 1e9
        )
    };
    println!(
        "{name:30} {:7} {m:5}x{k:5}x{n:5}  ours {} | gemm {} | matrixmultiply {}",
        format!("{layout:?}"),
        gf(ours),
        gf(gemm),
        gf(mm)
    );
}

fn main() {
    // The crates pick their own instruction set (AVX-512 where the CPU has
    // it: `gemm` with its `x86-v4` feature, `matrixmultiply` always);
    // MOE_SIMD caps only ours.
    println!(
        "# {} — ours at {}; gemm 0.19 (x86-v4 feature on), matrixmultiply 0.3 at their own best level; one thread; m x k x n",
        rosetta_moe::kernels::cpu_model(),
        rosetta_moe::kernels::simd_level(),
    );
    use Layout::{Dw, Dx, Forward};
    // The tiny and small models' y = x·Wᵀ at 32–64 tokens, and a cube.
    for (name, shape) in [
        ("64^3", (64, 64, 64)),
        ("tiny qkv/o", (64, 64, 96)),
        ("tiny expert gate|up (32 tok)", (32, 64, 512)),
        ("tiny expert down (32 tok)", (32, 256, 64)),
        ("64x64x256", (64, 64, 256)),
        ("64x256x64", (64, 256, 64)),
        ("tiny lm head 64x64x1000", (64, 64, 1000)),
        ("small qkv", (64, 256, 384)),
        ("small o", (64, 256, 256)),
        ("small expert gate|up", (32, 256, 2048)),
        ("small expert down", (32, 1024, 256)),
        ("small lm head", (64, 256, 1000)),
        ("big 256^3", (256, 256, 256)),
    ] {
        bench(name, Forward, shape);
    }
    // The tiny and small models' training steps at B 2 × S 8 (16 tokens; an
    // expert gets about 8 of them): an expert's forward and dX on so few rows,
    // where the AVX2 tile (6 × 16) needs two or three row tiles per strip of B
    // and the AVX-512 one (8 × 32) one or two.
    for (name, t, out, inp) in [
        ("tiny-step gate|up", 8, 512, 64),
        ("tiny-step gate|up", 16, 512, 64),
        ("tiny-step down", 8, 64, 256),
        ("tiny-step down", 16, 64, 256),
        ("small-step gate|up", 8, 2048, 256),
        ("small-step gate|up", 16, 2048, 256),
        ("small-step down", 8, 256, 1024),
        ("small-step down", 16, 256, 1024),
    ] {
        bench(name, Forward, (t, inp, out));
        bench(name, Dx, (t, out, inp));
    }
    // train_large_batch (B 16 × S 256 = 4,096 tokens, 2,048 rows per
    // expert on average): an expert's gate|up (W [1024, 256]) and down
    // (W [256, 1024]) in the three layouts of its training step.
    let (t, h, f) = (2048, 256, 1024);
    for (name, out, inp) in [("large-batch gate|up", f, h), ("large-batch down", h, f)] {
        bench(name, Forward, (t, inp, out));
        bench(name, Dx, (t, out, inp));
        bench(name, Dw, (out, t, inp));
    }
}
