use std::time::Instant;

fn bench(name: &str, m: usize, k: usize, n: usize) {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; m * n];
    let flops = 2.0 * (m * k * n) as f64;
    let iters = ((2e9 / flops) as usize).clamp(20, 200_000);
    let best = |f: &mut dyn FnMut()| {
        let mut times = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            times.push(t.elapsed().as_secs_f64() / iters as f64);
        }
        times.sort_by(f64::total_cmp);
        times[3]
    };
    // y = x·Wᵀ layout: A [m,k] row-major, B given as W [n,k] → B = Wᵀ (col stride k)
    let t_gemm = best(&mut || unsafe {
        gemm_crate::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm_crate::Parallelism::None,
        )
    });
    let t_mm = best(&mut || unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    });
    use rosetta_moe::kernels::{Mat, MatMut, Write, matmul};
    let t_ours = best(&mut || {
        matmul(
            MatMut::new(&mut c, m, n),
            Mat::new(&a, m, k),
            Mat::new(&b, n, k).t(),
            Write::Overwrite,
        )
    });
    println!(
        "{name:28} {m:5}x{k:5}x{n:5}  ours {:8.2} µs {:6.1} GF/s | gemm {:8.2} µs {:6.1} GF/s | matrixmultiply {:8.2} µs {:6.1} GF/s",
        t_ours * 1e6,
        flops / t_ours / 1e9,
        t_gemm * 1e6,
        flops / t_gemm / 1e9,
        t_mm * 1e6,
        flops / t_mm / 1e9
    );
}

fn main() {
    // The crates pick their own instruction set (AVX-512 where the CPU has
    // it: `gemm` with its `x86-v4` feature, `matrixmultiply` always);
    // MOE_SIMD caps only ours.
    println!(
        "# {} — ours at {}; gemm 0.19 (x86-v4 feature on), matrixmultiply 0.3 at their own best level; one thread",
        rosetta_moe::kernels::cpu_model(),
        rosetta_moe::kernels::simd_level(),
    );
    bench("64^3", 64, 64, 64);
    bench("tiny qkv/o", 64, 64, 96);
    bench("tiny expert gate|up (32 tok)", 32, 64, 512);
    bench("tiny expert down (32 tok)", 32, 256, 64);
    bench("64x64x256", 64, 64, 256);
    bench("64x256x64", 64, 256, 64);
    bench("tiny lm head 64x64x1000", 64, 64, 1000);
    bench("small qkv", 64, 256, 384);
    bench("small o", 64, 256, 256);
    bench("small expert gate|up", 32, 256, 2048);
    bench("small expert down", 32, 1024, 256);
    bench("small lm head", 64, 256, 1000);
    bench("big 256^3", 256, 256, 256);
}
