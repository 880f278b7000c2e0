//! The SIMD vocabulary every kernel is written in, and which instruction set
//! runs it.
//!
//! A kernel is written once, generic over [`Simd`]: a zero-sized token that
//! proves the CPU has an instruction set, with the few operations the kernels
//! need on a vector of **16 f32 lanes** (load, store, fused multiply-add,
//! divide, square root, a reduction, a 16 × 16 transpose, …). Each
//! instruction set implements that vocabulary in a small file of its own:
//!
//! | level    | file         | a 16-lane vector is          |
//! |----------|--------------|------------------------------|
//! | `avx512` | `avx512.rs`  | one zmm register (AVX-512F)  |
//! | `avx2`   | `avx2.rs`    | two ymm registers (AVX2+FMA) |
//! | `neon`   | `neon.rs`    | four q registers (aarch64)   |
//! | `scalar` | `scalar.rs`  | sixteen `f32`s               |
//!
//! **Why 16 lanes on every level.** Lane i of a vector computes the same IEEE
//! operations in the same order on every level — a multiply-add is always
//! fused, a sum of lanes always takes the same tree ([`Simd::reduce_add`]) —
//! so a kernel gives the same bits whichever level runs it. A machine with
//! narrower registers holds one logical vector in several; nothing about the
//! arithmetic depends on how many.
//!
//! The level is detected once ([`active`]); the environment variable
//! `MOE_SIMD=scalar|avx2|avx512|neon` caps it, so every path can be run on
//! one machine. [`simd_call!`] runs a generic kernel at a level, compiled for
//! it (`#[target_feature]`), so the vocabulary's intrinsics inline into the
//! kernel.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::Avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) use neon::Neon;
pub(crate) use scalar::Scalar;

use std::fmt;
use std::sync::OnceLock;

/// An instruction-set level the kernels can run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimdLevel {
    /// Plain Rust on 16-element arrays: any CPU (and the slowest).
    Scalar,
    /// AVX2 with FMA (x86-64-v3): two 8-lane registers per vector.
    Avx2,
    /// AVX-512F: one 16-lane register per vector.
    Avx512,
    /// aarch64 Advanced SIMD: four 4-lane registers per vector.
    Neon,
}

impl SimdLevel {
    /// Every level, in the order `MOE_SIMD` names them.
    pub const ALL: [SimdLevel; 4] = [
        SimdLevel::Scalar,
        SimdLevel::Avx2,
        SimdLevel::Avx512,
        SimdLevel::Neon,
    ];

    /// The name `MOE_SIMD` and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Neon => "neon",
        }
    }

    /// The level named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<SimdLevel> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Every level this CPU can run, slowest first (scalar always).
    pub fn supported() -> Vec<SimdLevel> {
        Self::ALL
            .into_iter()
            .filter(|&l| Token::new(l).is_some())
            .collect()
    }

    /// The fastest level this CPU can run.
    pub fn best() -> SimdLevel {
        *Self::supported().last().expect("scalar always runs")
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why `MOE_SIMD` cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimdLevelError {
    /// Not one of the level names.
    #[error("MOE_SIMD={0:?} is not a level: use scalar, avx2, avx512 or neon")]
    Unknown(String),
    /// A level this CPU lacks.
    #[error(
        "MOE_SIMD={asked}: this CPU cannot run it (it runs {})",
        supported_names()
    )]
    Unsupported {
        /// The level asked for.
        asked: SimdLevel,
    },
}

fn supported_names() -> String {
    let names: Vec<&str> = SimdLevel::supported()
        .into_iter()
        .map(SimdLevel::name)
        .collect();
    names.join(", ")
}

/// The level `MOE_SIMD` asks for (the best one when it is unset or empty).
pub fn requested_level() -> Result<SimdLevel, SimdLevelError> {
    let asked = std::env::var("MOE_SIMD").unwrap_or_default();
    if asked.is_empty() {
        return Ok(SimdLevel::best());
    }
    let level = SimdLevel::from_name(&asked).ok_or(SimdLevelError::Unknown(asked))?;
    Token::new(level)
        .map(|_| level)
        .ok_or(SimdLevelError::Unsupported { asked: level })
}

/// The token every kernel call of this process runs with, chosen once:
/// `MOE_SIMD`'s level, or the best one. (The command line checks
/// [`requested_level`] first and reports a bad value as an error; a library
/// user who sets a bad one gets a panic with the same message here.)
pub(crate) fn active() -> Token {
    static ACTIVE: OnceLock<Token> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let level = requested_level().unwrap_or_else(|e| panic!("{e}"));
        Token::new(level).expect("requested_level checked it")
    })
}

/// The level this process's kernels run at.
pub fn simd_level() -> SimdLevel {
    active().level()
}

/// This CPU's model name, as the kernel reports it ("unknown" where it does not).
pub fn cpu_model() -> String {
    cpu_model_from(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// The first processor's model name in a `/proc/cpuinfo` text, with its
/// family and model numbers when given: a VM may call CPUs of different
/// generations alike ("AMD EPYC" for Zen 3 and Zen 4).
fn cpu_model_from(info: &str) -> String {
    let first = info.split("\n\n").next().unwrap_or_default();
    let field = |key: &str| {
        first.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key).then(|| v.trim())
        })
    };
    let name = field("model name").unwrap_or("unknown");
    match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => format!("{name} (family {family}, model {model})"),
        _ => name.to_string(),
    }
}

/// One line for `moe --version` and the reports: the level in use (or why
/// `MOE_SIMD` cannot be honoured), every level this CPU can run, and the CPU.
pub fn describe() -> String {
    let level = match requested_level() {
        Ok(level) => format!("SIMD {level} (this CPU runs {})", supported_names()),
        Err(e) => format!("SIMD: {e}"),
    };
    format!("{level}; CPU {}", cpu_model())
}

/// A level with the proof that this CPU can run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    Scalar(Scalar),
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
    #[cfg(target_arch = "aarch64")]
    Neon(Neon),
}

impl Token {
    /// The token of `level`, if this CPU can run it.
    pub(crate) fn new(level: SimdLevel) -> Option<Token> {
        match level {
            SimdLevel::Scalar => Some(Token::Scalar(Scalar)),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => Avx2::detect().map(Token::Avx2),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => Avx512::detect().map(Token::Avx512),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon => Neon::detect().map(Token::Neon),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Its level.
    pub(crate) fn level(self) -> SimdLevel {
        match self {
            Token::Scalar(_) => SimdLevel::Scalar,
            #[cfg(target_arch = "x86_64")]
            Token::Avx2(_) => SimdLevel::Avx2,
            #[cfg(target_arch = "x86_64")]
            Token::Avx512(_) => SimdLevel::Avx512,
            #[cfg(target_arch = "aarch64")]
            Token::Neon(_) => SimdLevel::Neon,
        }
    }

    /// Every token this CPU can run (for tests that compare levels).
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Token> {
        SimdLevel::supported()
            .into_iter()
            .filter_map(Token::new)
            .collect()
    }
}

/// Runs `$f(simd, args…)` — a kernel generic over [`Simd`] — with the level
/// of `$token`, compiled for that level's instruction set.
macro_rules! simd_call {
    ($token:expr, $($f:ident)::+($($arg:expr),* $(,)?)) => {
        match $token {
            $crate::kernels::simd::Token::Scalar(s) => $($f)::+(s, $($arg),*),
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::Token::Avx2(s) => s.run(#[inline(always)] || $($f)::+(s, $($arg),*)),
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::Token::Avx512(s) => s.run(#[inline(always)] || $($f)::+(s, $($arg),*)),
            #[cfg(target_arch = "aarch64")]
            $crate::kernels::simd::Token::Neon(s) => s.run(#[inline(always)] || $($f)::+(s, $($arg),*)),
        }
    };
}
pub(crate) use simd_call;

/// `[f(0), f(1), …, f(N − 1)]`, inlined whole into the kernel that calls it.
/// (`std::array::from_fn` may stay a call, compiled without the kernel's
/// instruction set — and every intrinsic inside it would stay a call too.)
#[inline(always)]
pub(crate) fn array_of<T: Copy, const N: usize>(mut f: impl FnMut(usize) -> T) -> [T; N] {
    let mut out = [f(0); N];
    for (i, x) in out.iter_mut().enumerate().skip(1) {
        *x = f(i);
    }
    out
}

/// The vocabulary of 16-lane f32 vectors the kernels are written in.
///
/// Every operation is IEEE single precision with round-to-nearest, lane by
/// lane, exactly as its formula says: `mul_add` rounds once; nothing is an
/// approximation. Constructors take the token, so a vector exists only on a
/// CPU that can run it.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    /// Sixteen f32 lanes.
    type V: Copy;
    /// Sixteen f64 lanes, for sums kept in double precision.
    type D: Copy;

    /// Rows of C in one matrix-multiply micro-kernel tile.
    const TILE_ROWS: usize;
    /// 16-lane vectors across one tile row (the tile is 16·TILE_VECS wide).
    const TILE_VECS: usize;
    /// Rows of W a weight-rows tile keeps in registers at a time.
    const WEIGHT_ROWS: usize;
    /// A weight-rows tile of at most 8 tokens holds two rows of W per
    /// vector ([`Simd::splat_halves`]) instead of leaving half its lanes
    /// empty: on for the levels where that was measured faster.
    const PAIRED_WEIGHT_ROWS: bool;
    /// Independent multiply-add chains that keep this level's units busy.
    const FMA_CHAINS: usize;
    /// Side of the block of dots [`super::vector::dots_4x4`] keeps in
    /// registers at once: 4 (all sixteen) or 2.
    const GRAM_SIDE: usize;

    /// All lanes zero.
    fn zero(self) -> Self::V;
    /// All f64 lanes zero.
    fn zero_f64(self) -> Self::D;
    /// acc_i + x_i² in f64: x_i² of an f32 is exact in f64 (48 bits), so
    /// only the sum rounds — fused or not, every level gets the same bits.
    fn add_squares_f64(self, acc: Self::D, x: Self::V) -> Self::D;
    /// The sixteen f64 lanes, lane i at index i.
    fn lanes_f64(self, acc: Self::D) -> [f64; 16];
    /// All lanes x.
    fn splat(self, x: f32) -> Self::V;
    /// Lanes 0..8 lo, lanes 8..16 hi.
    fn splat_halves(self, lo: f32, hi: f32) -> Self::V;
    /// Lanes p[0..16].
    ///
    /// # Safety
    /// 16 floats must be readable at `p`.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// Lanes p[0..n], zero past them (n ≤ 16).
    ///
    /// # Safety
    /// `n` floats must be readable at `p`; nothing past them is read.
    unsafe fn load_first(self, p: *const f32, n: usize) -> Self::V;
    /// p[0..16] = lanes.
    ///
    /// # Safety
    /// 16 floats must be writable at `p`.
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// p[0..n] = the first n lanes (n ≤ 16).
    ///
    /// # Safety
    /// `n` floats must be writable at `p`; nothing past them is touched.
    unsafe fn store_first(self, p: *mut f32, n: usize, v: Self::V);

    /// a + b
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// a − b
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// a · b
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// a / b (IEEE division)
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// √a (IEEE square root)
    fn sqrt(self, a: Self::V) -> Self::V;
    /// a·b + c, rounded once.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// c − a·b, rounded once.
    fn neg_mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The larger of a and b (for numbers; NaN handling is the CPU's).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// The smaller of a and b (for numbers).
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// a rounded to the nearest integer, ties to even.
    fn round(self, a: Self::V) -> Self::V;
    /// 2ⁿ for lanes n that hold integers in −126..=127.
    fn exp2i(self, n: Self::V) -> Self::V;

    /// Σ of the 16 lanes by one fixed tree on every level: lanes i and i + 8
    /// first, then i and i + 4, i and i + 2, and the last two:
    ///   s8_i = v_i + v_(i+8);  s4_i = s8_i + s8_(i+4);  s2_i = s4_i + s4_(i+2);  s2_0 + s2_1
    fn reduce_add(self, v: Self::V) -> f32;
    /// The largest lane (exact: no order to fix).
    fn reduce_max(self, v: Self::V) -> f32;
    /// out[c] lane r = rows[r] lane c.
    fn transpose(self, rows: [Self::V; 16]) -> [Self::V; 16];
    /// Asks for the cache line at `p` to be brought into L2 (a hint: it
    /// never faults, whatever `p` is).
    fn prefetch(self, p: *const f32);
}

/// Where a kernel's loop stands: [`Lanes::Whole`] while 16 lanes remain
/// (plain loads and stores, one bounds test each, which the compiler can
/// fold), [`Lanes::Tail`] at the last, partial vector ([`load_at`]'s and
/// [`store_at`]'s tests per lane count). At AVX2 `load_at`'s tests in every
/// step cost a compare and a jump per register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lanes {
    /// x[i..i + 16] lies inside x.
    Whole,
    /// Fewer than 16 lanes may remain.
    Tail,
}

impl Lanes {
    /// 16 lanes of `x[i..]`, zeros past its end.
    #[inline(always)]
    pub(crate) fn load<S: Simd>(self, s: S, x: &[f32], i: usize) -> S::V {
        match self {
            Lanes::Whole => {
                let x = &x[i..i + 16];
                // SAFETY: `x` holds 16 floats.
                unsafe { s.load(x.as_ptr()) }
            }
            Lanes::Tail => load_at(s, x, i),
        }
    }

    /// Writes the lanes of `v` that fall inside `x[i..]`.
    #[inline(always)]
    pub(crate) fn store<S: Simd>(self, s: S, x: &mut [f32], i: usize, v: S::V) {
        match self {
            Lanes::Whole => {
                let x = &mut x[i..i + 16];
                // SAFETY: `x` holds 16 floats.
                unsafe { s.store(x.as_mut_ptr(), v) }
            }
            Lanes::Tail => store_at(s, x, i, v),
        }
    }
}

/// `step(i, lanes)` for i = 0, 16, 32, … below `len`: [`Lanes::Whole`]
/// while 16 lanes remain, then [`Lanes::Tail`] once for the rest.
#[inline(always)]
pub(crate) fn for_each_vector(len: usize, mut step: impl FnMut(usize, Lanes)) {
    let whole = len / 16 * 16;
    for i in (0..whole).step_by(16) {
        step(i, Lanes::Whole);
    }
    if whole < len {
        step(whole, Lanes::Tail);
    }
}

/// 16 lanes of `x[i..]`, zeros past its end.
#[inline(always)]
pub(crate) fn load_at<S: Simd>(s: S, x: &[f32], i: usize) -> S::V {
    let n = x.len().saturating_sub(i);
    // SAFETY: `n` floats from i are inside `x`; at most min(n, 16) are read.
    unsafe {
        if n >= 16 {
            s.load(x.as_ptr().add(i))
        } else if n == 0 {
            s.zero()
        } else {
            s.load_first(x.as_ptr().add(i), n)
        }
    }
}

/// Writes the lanes of `v` that fall inside `x[i..]`.
#[inline(always)]
pub(crate) fn store_at<S: Simd>(s: S, x: &mut [f32], i: usize, v: S::V) {
    let n = x.len().saturating_sub(i);
    // SAFETY: `n` floats from i are inside `x`; at most min(n, 16) are written.
    unsafe {
        if n >= 16 {
            s.store(x.as_mut_ptr().add(i), v)
        } else if n > 0 {
            s.store_first(x.as_mut_ptr().add(i), n, v)
        }
    }
}

/// e^x on 16 lanes, from operations every level has (no approximate
/// reciprocal; |error| ≤ 2 ulp on the clamped range, Cephes expf):
///   x clamped to [−104, 88.72];  n = round(x·log2 e);  r = x − n·ln 2 (in two parts)
///   e^r ≈ 1 + r + r²·P(r);  e^x = (e^r·2^⌊n/2⌉)·2^(n−⌊n/2⌉)
/// (2ⁿ in two factors, each a normal number, so a result below the normal
/// range rounds once, in the second product.)
#[inline(always)]
pub(crate) fn exp<S: Simd>(s: S, x: S::V) -> S::V {
    let x = s.min(s.max(x, s.splat(-104.0)), s.splat(88.72));
    let n = s.round(s.mul(x, s.splat(std::f32::consts::LOG2_E)));
    let r = s.neg_mul_add(n, s.splat(0.693_359_4), x);
    let r = s.neg_mul_add(n, s.splat(-2.121_944_4e-4), r);
    let mut p = s.splat(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = s.mul_add(p, r, s.splat(c));
    }
    let e_r = s.add(s.mul_add(p, s.mul(r, r), r), s.splat(1.0));
    let half = s.round(s.mul(n, s.splat(0.5)));
    s.mul(s.mul(e_r, s.exp2i(half)), s.exp2i(s.sub(n, half)))
}

/// σ(z) = 1/(1 + e^(−z)) on 16 lanes.
#[inline(always)]
pub(crate) fn sigmoid<S: Simd>(s: S, z: S::V) -> S::V {
    let one = s.splat(1.0);
    s.div(one, s.add(one, exp(s, s.sub(s.zero(), z))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_model_names_family_and_model_of_the_first_processor() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\
                    model\t\t: 17\nmodel name\t: AMD EPYC\n\n\
                    processor\t: 1\ncpu family\t: 99\nmodel\t\t: 1\nmodel name\t: other\n";
        assert_eq!(cpu_model_from(info), "AMD EPYC (family 25, model 17)");
        assert_eq!(cpu_model_from("model name\t: Neoverse\n"), "Neoverse");
        assert_eq!(cpu_model_from(""), "unknown");
    }

    fn values(seed: u32) -> [f32; 16] {
        std::array::from_fn(|i| {
            ((i as u32 * 2_654_435_761).wrapping_add(seed) % 2001) as f32 / 7.0 - 140.0
        })
    }

    fn run_all<R: PartialEq + fmt::Debug>(what: &str, f: impl Fn(Token) -> R) {
        let tokens = Token::all();
        let want = f(tokens[0]);
        for &t in &tokens[1..] {
            assert_eq!(f(t), want, "{what} at {}", t.level());
        }
    }

    fn bits(v: [f32; 16]) -> [u32; 16] {
        v.map(f32::to_bits)
    }

    fn exp_of<S: Simd>(s: S, x: &[f32; 16]) -> [u32; 16] {
        let mut out = [0.0; 16];
        store_at(s, &mut out, 0, exp(s, load_at(s, x, 0)));
        bits(out)
    }

    fn sums_of<S: Simd>(s: S, seed: u32) -> (u32, [u32; 16]) {
        let rows: [S::V; 16] = std::array::from_fn(|r| load_at(s, &values(seed + r as u32), 0));
        let mut t = [[0.0; 16]; 16];
        for (out, v) in t.iter_mut().zip(s.transpose(rows)) {
            store_at(s, out, 0, v);
        }
        let column0: [f32; 16] = t[0];
        (s.reduce_add(rows[3]).to_bits(), bits(column0))
    }

    fn halves_of<S: Simd>(s: S) -> [u32; 16] {
        let mut out = [0.0; 16];
        store_at(s, &mut out, 0, s.splat_halves(1.5, -2.25));
        bits(out)
    }

    #[test]
    fn splat_halves_puts_lo_in_lanes_0_to_8_and_hi_in_8_to_16_at_every_level() {
        let want = bits(std::array::from_fn(|i| if i < 8 { 1.5 } else { -2.25 }));
        for token in Token::all() {
            assert_eq!(simd_call!(token, halves_of()), want, "{}", token.level());
        }
    }

    #[test]
    fn every_level_computes_the_same_bits() {
        for seed in [1, 2, 3] {
            let x = values(seed).map(|v| v / 2.0);
            run_all("exp", |t| simd_call!(t, exp_of(&x)));
            run_all("sums", |t| simd_call!(t, sums_of(seed)));
        }
        // The tree is the documented one, and the transpose a transpose.
        let (sum, column0) = simd_call!(Token::Scalar(Scalar), sums_of(1));
        let v = values(4);
        let s8: Vec<f32> = (0..8).map(|i| v[i] + v[i + 8]).collect();
        let s4: Vec<f32> = (0..4).map(|i| s8[i] + s8[i + 4]).collect();
        let want = (s4[0] + s4[2]) + (s4[1] + s4[3]);
        assert_eq!(f32::from_bits(sum), want);
        let first: Vec<u32> = (0..16)
            .map(|r| values(1 + r).map(f32::to_bits)[0])
            .collect();
        assert_eq!(column0.to_vec(), first);
    }

    #[test]
    fn exp_is_close_to_the_library_and_handles_the_ends() {
        let x: [f32; 16] = std::array::from_fn(|i| i as f32 * 6.0 - 50.0);
        let got = simd_call!(active(), exp_of(&x)).map(f32::from_bits);
        for (g, x) in got.iter().zip(x) {
            let want = x.exp();
            assert!(
                (g - want).abs() <= 4.0 * f32::EPSILON * want,
                "{x}: {g} vs {want}"
            );
        }
        let ends = [
            -1e30,
            f32::NEG_INFINITY,
            -104.5,
            -90.0,
            88.7,
            1e30,
            0.0,
            -0.0,
        ];
        let mut x = [0.0; 16];
        x[..8].copy_from_slice(&ends);
        let got = simd_call!(active(), exp_of(&x)).map(f32::from_bits);
        assert_eq!(&got[..3], &[0.0, 0.0, 0.0]);
        assert!((got[3] / (-90.0f32).exp() - 1.0).abs() < 1e-4, "{}", got[3]);
        assert!(got[4].is_finite() && got[5].is_finite() && got[5] > 3e38);
        assert_eq!(&got[6..8], &[1.0, 1.0]);
    }

    #[test]
    fn moe_simd_names_parse_and_the_best_level_runs() {
        for level in SimdLevel::ALL {
            assert_eq!(SimdLevel::from_name(level.name()), Some(level));
        }
        assert_eq!(SimdLevel::from_name("sse"), None);
        assert_eq!(SimdLevel::supported()[0], SimdLevel::Scalar);
        assert!(Token::new(SimdLevel::best()).is_some());
    }
}
