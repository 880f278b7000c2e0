//! How fast the AdamW kernel runs over buffers in cache and in DRAM, with its
//! four buffers (p, g, m, v) at the same offset in a 4 KB page — where large
//! allocations land — and staggered a quarter of a page apart, as the trainer
//! places them (`kernels::Buffer`). Cycles per 16-lane vector, and the bytes
//! it moves (p, g, m, v read, p, m, v written: 28 bytes per parameter).
//! First, the square root and division every vector needs, timed alone
//! (`kernels::sqrt_div_seconds`): the pass's floor when its data is in cache.
//!
//!     cargo run --release --example adamw_speed > docs/perf/adamw-speed.txt

use std::time::{Duration, Instant};

use rosetta_moe::kernels::{self, AdamWStep, Buffer, Stream};

fn main() {
    println!("# cargo run --release --example adamw_speed (one core; best of 5 sweeps)");
    // One 16-lane FMA (32 FLOPs) per cycle at the peak.
    let ghz = kernels::fma_peak_gflops(Duration::from_millis(300)) / 32.0;
    let pair = kernels::sqrt_div_seconds(Duration::from_millis(300));
    println!(
        "16-lane square root + division alone: {:5.1} cycles per vector at {ghz:.2} GHz",
        pair * ghz * 1e9
    );
    let step = AdamWStep::new((0.9, 0.95), 1e-8, 1e-3, 1);
    for n in [4096usize, 65_536, 542_528, 7_134_464] {
        let same = [Stream::Params; 4];
        let staggered = [
            Stream::Params,
            Stream::Gradients,
            Stream::FirstMoment,
            Stream::SecondMoment,
        ];
        for (placement, streams) in [("same offset", same), ("staggered  ", staggered)] {
            let [mut p, mut g, mut m, mut v] = streams.map(|s| Buffer::zeroed(n, s));
            g.fill(0.1);
            let reps = (50_000_000 / n).max(3);
            let best = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..reps {
                        kernels::adamw(&mut p, &g, &mut m, &mut v, step);
                    }
                    start.elapsed().as_secs_f64() / reps as f64
                })
                .fold(f64::INFINITY, f64::min);
            let vectors = n as f64 / 16.0;
            println!(
                "{n:9} parameters ({:6.2} MB of p, g, m, v), {placement}: {:8.1} µs · {:5.1} cycles per vector at {ghz:.2} GHz · {:5.1} GB/s",
                16.0 * n as f64 / 1e6,
                best * 1e6,
                best * ghz * 1e9 / vectors,
                28.0 * n as f64 / best / 1e9,
            );
        }
    }
}
