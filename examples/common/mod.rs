//! Timing shared by the examples that sweep over copies of a weight.

use std::time::Instant;

/// Median seconds per call of `run(copy)` over every copy, of `sweeps` sweeps.
pub fn median_per_call(sweeps: usize, copies: usize, mut run: impl FnMut(usize)) -> f64 {
    let mut times: Vec<f64> = (0..sweeps)
        .map(|_| {
            let start = Instant::now();
            (0..copies).for_each(&mut run);
            start.elapsed().as_secs_f64() / copies as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[sweeps / 2]
}
