//! The 22 scenarios of CONTRACT §10 and `train_large_batch`: what each one runs, on which inputs, and
//! how many tokens and FLOPs one run counts for.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::json;

use rosetta_moe::config::{ModelConfig, TrainConfig};
use rosetta_moe::error::{MoeError, Result};
use rosetta_moe::kernels::{self, Mat, MatMut, Write};
use rosetta_moe::layers;
use rosetta_moe::model::{Batch, Model};
use rosetta_moe::train::Trainer;

/// What one scenario runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Workload {
    /// `Model::forward` on B × S tokens.
    Forward {
        /// Preset name.
        config: &'static str,
        /// B.
        batch: usize,
        /// S.
        seq: usize,
    },
    /// `Trainer::train_step` on B × S tokens.
    TrainStep {
        /// Preset name.
        config: &'static str,
        /// B.
        batch: usize,
        /// S.
        seq: usize,
    },
    /// C = A·B, 64 × 64 × 64.
    Matmul,
    /// Softmax of 1000 normals into a preallocated buffer.
    Softmax,
    /// RMSNorm on [2, 32, 64].
    RmsNorm,
    /// Build the tiny model, then its first forward (B 1, S 8).
    Cold,
    /// `threads` independent models, one forward each (B 2, S 32), concurrently.
    ParallelForward {
        /// Number of models and threads.
        threads: usize,
    },
    /// `threads` independent trainers, one step each (B 2, S 8), concurrently.
    ParallelTrain {
        /// Number of trainers and threads.
        threads: usize,
    },
}

/// One scenario of the suite.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Identifier (CONTRACT §10).
    pub id: String,
    /// One of memory, compiler, type_system, parallel, scale.
    pub axis: &'static str,
    /// What runs.
    pub workload: Workload,
    /// Intra-op threads the scenario always runs with, whatever `--threads`
    /// says (`None`: `--threads`).
    pub intra_op: Option<usize>,
}

/// The 22 scenarios, in the contract's order, then `train_large_batch`.
pub fn all() -> Vec<Scenario> {
    let mut out = Vec::new();
    let mut add = |id: String, axis, workload| {
        out.push(Scenario {
            id,
            axis,
            workload,
            intra_op: None,
        })
    };
    add(
        "mem_train_step".into(),
        "memory",
        Workload::TrainStep {
            config: "tiny",
            batch: 2,
            seq: 8,
        },
    );
    for batch in [1, 2, 4, 8] {
        let w = Workload::Forward {
            config: "tiny",
            batch,
            seq: 32,
        };
        add(format!("mem_scale_batch_{batch}"), "memory", w);
    }
    for seq in [8, 16, 32, 64] {
        let w = Workload::Forward {
            config: "tiny",
            batch: 2,
            seq,
        };
        add(format!("mem_scale_seq_{seq}"), "memory", w);
    }
    add("kernel_matmul".into(), "compiler", Workload::Matmul);
    add("kernel_softmax".into(), "compiler", Workload::Softmax);
    add("kernel_rmsnorm".into(), "compiler", Workload::RmsNorm);
    let warm = Workload::Forward {
        config: "tiny",
        batch: 2,
        seq: 32,
    };
    add("dispatch_warm".into(), "type_system", warm);
    add("dispatch_cold".into(), "type_system", Workload::Cold);
    for threads in [1, 2, 4] {
        add(
            format!("parallel_T{threads}"),
            "parallel",
            Workload::ParallelForward { threads },
        );
    }
    for threads in [1, 2, 4] {
        add(
            format!("parallel_train_T{threads}"),
            "parallel",
            Workload::ParallelTrain { threads },
        );
    }
    let small_forward = Workload::Forward {
        config: "small",
        batch: 2,
        seq: 32,
    };
    add("scale_forward_256".into(), "scale", small_forward);
    let small_train = Workload::TrainStep {
        config: "small",
        batch: 2,
        seq: 8,
    };
    add("scale_train_256".into(), "scale", small_train);
    // Beyond the contract's 22 (issue 23): a training step at the batch
    // size real training uses, 4,096 tokens, on two cores — where every
    // product is compute-bound and the step should run near the peak.
    out.push(Scenario {
        id: "train_large_batch".into(),
        axis: "scale",
        workload: Workload::TrainStep {
            config: "small",
            batch: 16,
            seq: 256,
        },
        intra_op: Some(2),
    });
    out
}

/// Matrix FLOPs of one forward over B × S tokens (CONTRACT §10: a
/// multiply-add counts 2, attention is counted full-square, experts active only).
pub fn forward_flops(config: &ModelConfig, batch: usize, seq: usize) -> f64 {
    let (h, t) = (config.hidden_dim as f64, (batch * seq) as f64);
    let heads_dim = (config.n_heads * config.head_dim) as f64;
    let per_layer = 2.0 * t * h * config.qkv_dim() as f64
        + 2.0 * t * heads_dim * h
        + 4.0 * (batch * config.n_heads * seq * seq * config.head_dim) as f64
        + router_flops(config, batch, seq)
        + t * config.top_k as f64 * 6.0 * h * config.ffn_dim as f64;
    config.n_layers as f64 * per_layer + 2.0 * t * h * config.vocab_size as f64
}

/// FLOPs of the routers of one forward (all layers count the same, so per layer).
fn router_flops(config: &ModelConfig, batch: usize, seq: usize) -> f64 {
    2.0 * (batch * seq * config.hidden_dim * config.n_experts) as f64
}

/// FLOPs of one training step as CONTRACT §10 counts them: the forward plus
/// a backward of twice the forward, without the routers' backward (the
/// convention of the published suite, kept so the figures compare).
pub fn train_flops(config: &ModelConfig, batch: usize, seq: usize) -> f64 {
    3.0 * forward_flops(config, batch, seq)
        - 2.0 * config.n_layers as f64 * router_flops(config, batch, seq)
}

/// Bytes a run must move at least once, by phase, for its roofline floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Traffic {
    /// Bytes streamed while the matrix products run (forward and backward):
    /// they can overlap with the arithmetic.
    pub overlapped: f64,
    /// Bytes of a pure streaming phase with no arithmetic to hide behind
    /// (the AdamW pass).
    pub streaming: f64,
    /// Bytes the run keeps live (which memory level they stream from).
    pub working_set: f64,
}

impl Traffic {
    /// A model's traffic, with P parameters of 4 bytes:
    /// forward reads the weights once (4P); a training step also reads them
    /// again for dX (4P), then — once the gradient norm is known — AdamW
    /// reads p, m, v and writes them back (24P). The gradient itself need
    /// not stream: with few tokens it can be formed in cache from its
    /// factors right before AdamW uses it (`kernels::adamw_tensors`), which is
    /// what the trainer does.
    fn model(config: &ModelConfig, train: bool) -> Self {
        let weights = 4.0 * config.param_count() as f64;
        if train {
            Traffic {
                overlapped: 2.0 * weights,
                streaming: 6.0 * weights,
                working_set: 3.0 * weights,
            }
        } else {
            Traffic {
                overlapped: weights,
                streaming: 0.0,
                working_set: weights,
            }
        }
    }

    /// A kernel whose operands live in cache.
    fn in_cache(bytes: f64) -> Self {
        Traffic {
            overlapped: bytes,
            streaming: 0.0,
            working_set: bytes,
        }
    }

    /// `n` independent copies, one per core (each streams from the level its
    /// own working set fits in).
    fn times(self, n: usize) -> Self {
        let n = n as f64;
        Traffic {
            overlapped: self.overlapped * n,
            streaming: self.streaming * n,
            ..self
        }
    }
}

impl Scenario {
    /// Tokens one run processes (rows of the kernel for kernel scenarios).
    pub fn tokens(&self) -> usize {
        match self.workload {
            Workload::Forward { batch, seq, .. } | Workload::TrainStep { batch, seq, .. } => {
                batch * seq
            }
            Workload::Matmul | Workload::RmsNorm => 64,
            Workload::Softmax => 1,
            Workload::Cold => 8,
            Workload::ParallelForward { threads } => threads * 64,
            Workload::ParallelTrain { threads } => threads * 16,
        }
    }

    /// Threads the workload runs on.
    pub fn threads(&self) -> usize {
        match self.workload {
            Workload::ParallelForward { threads } | Workload::ParallelTrain { threads } => threads,
            _ => self.intra_op.unwrap_or(1),
        }
    }

    /// FLOPs of one run.
    pub fn flops(&self) -> f64 {
        let tiny = ModelConfig::tiny();
        match self.workload {
            Workload::Forward { config, batch, seq } => forward_flops(&preset(config), batch, seq),
            Workload::TrainStep { config, batch, seq } => train_flops(&preset(config), batch, seq),
            Workload::Matmul => 524_288.0,
            Workload::Softmax => 4_000.0,
            Workload::RmsNorm => 12_288.0,
            Workload::Cold => forward_flops(&tiny, 1, 8),
            Workload::ParallelForward { threads } => threads as f64 * forward_flops(&tiny, 2, 32),
            Workload::ParallelTrain { threads } => threads as f64 * train_flops(&tiny, 2, 8),
        }
    }

    /// The memory traffic one run cannot avoid (see [`Traffic`]); `None` for
    /// the cold start, whose cost is building the model, not arithmetic.
    pub fn traffic(&self) -> Option<Traffic> {
        let tiny = ModelConfig::tiny();
        let matrix = (64 * 64 * 4) as f64;
        Some(match self.workload {
            Workload::Forward { config, .. } => Traffic::model(&preset(config), false),
            Workload::TrainStep { config, .. } => Traffic::model(&preset(config), true),
            Workload::Matmul => Traffic::in_cache(3.0 * matrix),
            Workload::Softmax => Traffic::in_cache(8_000.0),
            Workload::RmsNorm => Traffic::in_cache(2.0 * matrix),
            Workload::Cold => return None,
            Workload::ParallelForward { threads } => Traffic::model(&tiny, false).times(threads),
            Workload::ParallelTrain { threads } => Traffic::model(&tiny, true).times(threads),
        })
    }

    /// The scenario's parameters, as reported in the JSON.
    pub fn params(&self) -> serde_json::Value {
        match self.workload {
            Workload::Forward { config, batch, seq } => {
                json!({"config": config, "op": "forward", "batch": batch, "seq_len": seq})
            }
            Workload::TrainStep { config, batch, seq } => {
                json!({"config": config, "op": "train_step", "batch": batch, "seq_len": seq})
            }
            Workload::Matmul => json!({"op": "matmul", "m": 64, "k": 64, "n": 64}),
            Workload::Softmax => json!({"op": "softmax", "n": 1000}),
            Workload::RmsNorm => json!({"op": "rmsnorm", "shape": [2, 32, 64]}),
            Workload::Cold => {
                json!({"config": "tiny", "op": "build + first forward", "batch": 1, "seq_len": 8})
            }
            Workload::ParallelForward { threads } => {
                json!({"config": "tiny", "op": "forward", "threads": threads, "batch": 2, "seq_len": 32})
            }
            Workload::ParallelTrain { threads } => {
                json!({"config": "tiny", "op": "train_step", "threads": threads, "batch": 2, "seq_len": 8})
            }
        }
    }

    /// Sets the scenario up (untimed) for runs with `seed`.
    pub fn prepare(&self, seed: u64) -> Result<Box<dyn Runner>> {
        Ok(match self.workload {
            Workload::Forward { config, batch, seq } => {
                Box::new(ForwardRun::new(preset(config), seed, batch, seq)?)
            }
            Workload::TrainStep { config, batch, seq } => {
                Box::new(TrainRun::new(preset(config), seed, batch, seq)?)
            }
            Workload::Matmul => Box::new(MatmulRun::new(seed)),
            Workload::Softmax => Box::new(SoftmaxRun::new(seed)),
            Workload::RmsNorm => Box::new(RmsNormRun::new(seed)),
            Workload::Cold => Box::new(ColdRun {
                seed,
                logits: Vec::new(),
            }),
            Workload::ParallelForward { threads } => Box::new(Parallel::new(threads, move |_| {
                Ok(Box::new(ForwardRun::new(ModelConfig::tiny(), seed, 2, 32)?)
                    as Box<dyn Runner + Send>)
            })?),
            Workload::ParallelTrain { threads } => Box::new(Parallel::new(threads, move |_| {
                Ok(Box::new(TrainRun::new(ModelConfig::tiny(), seed, 2, 8)?)
                    as Box<dyn Runner + Send>)
            })?),
        })
    }
}

/// A preset by the name the scenarios use.
fn preset(name: &str) -> ModelConfig {
    ModelConfig::preset(name).expect("scenarios name real presets")
}

/// The contract's inputs: flat index i over B·S, id = i mod 1000, target = (i+1) mod 1000.
pub fn inputs(batch: usize, seq: usize) -> Result<Batch> {
    let ids = (0..batch * seq).map(|i| (i % 1000) as u32).collect();
    let targets = (0..batch * seq).map(|i| ((i + 1) % 1000) as u32).collect();
    Batch::new(ids, targets, batch)
}

/// Something a trial runs repeatedly.
pub trait Runner {
    /// One run of the workload.
    fn run(&mut self) -> Result<()>;
    /// Values the last run produced, checked for NaN, ∞ and magnitude
    /// (called once, after the timed trials).
    fn output(&mut self) -> Vec<f32>;
}

struct ForwardRun {
    model: Model,
    batch: Batch,
}

impl ForwardRun {
    fn new(config: ModelConfig, seed: u64, batch: usize, seq: usize) -> Result<Self> {
        Ok(ForwardRun {
            model: Model::new(config, seed)?,
            batch: inputs(batch, seq)?,
        })
    }
}

impl Runner for ForwardRun {
    fn run(&mut self) -> Result<()> {
        self.model
            .forward(&self.batch.ids, self.batch.batch_size)
            .map(|_| ())
    }
    fn output(&mut self) -> Vec<f32> {
        self.model.logits().to_vec()
    }
}

struct TrainRun {
    trainer: Trainer,
    batch: Batch,
    last: Vec<f32>,
}

impl TrainRun {
    fn new(config: ModelConfig, seed: u64, batch: usize, seq: usize) -> Result<Self> {
        let train = TrainConfig {
            seed,
            ..TrainConfig::default()
        };
        Ok(TrainRun {
            trainer: Trainer::new(Model::new(config, seed)?, train)?,
            batch: inputs(batch, seq)?,
            last: Vec::new(),
        })
    }
}

impl Runner for TrainRun {
    fn run(&mut self) -> Result<()> {
        let stats = self.trainer.train_step(&self.batch)?;
        self.last.clear();
        self.last
            .extend([stats.loss, stats.ce, stats.aux, stats.grad_norm]);
        Ok(())
    }
    fn output(&mut self) -> Vec<f32> {
        self.last.clone()
    }
}

fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

struct MatmulRun {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl MatmulRun {
    fn new(seed: u64) -> Self {
        MatmulRun {
            a: normals(64 * 64, seed),
            b: normals(64 * 64, seed + 1),
            c: vec![0.0; 64 * 64],
        }
    }
}

impl Runner for MatmulRun {
    fn run(&mut self) -> Result<()> {
        let c = MatMut::new(&mut self.c, 64, 64);
        kernels::matmul(
            c,
            Mat::new(&self.a, 64, 64),
            Mat::new(&self.b, 64, 64),
            Write::Overwrite,
        );
        Ok(())
    }
    fn output(&mut self) -> Vec<f32> {
        self.c.clone()
    }
}

struct SoftmaxRun {
    input: Vec<f32>,
    out: Vec<f32>,
}

impl SoftmaxRun {
    fn new(seed: u64) -> Self {
        SoftmaxRun {
            input: normals(1000, seed),
            out: vec![0.0; 1000],
        }
    }
}

impl Runner for SoftmaxRun {
    fn run(&mut self) -> Result<()> {
        self.out.copy_from_slice(&self.input);
        kernels::softmax_in_place(&mut self.out);
        Ok(())
    }
    fn output(&mut self) -> Vec<f32> {
        self.out.clone()
    }
}

struct RmsNormRun {
    x: Vec<f32>,
    gamma: Vec<f32>,
    y: Vec<f32>,
    inv_rms: Vec<f32>,
}

impl RmsNormRun {
    fn new(seed: u64) -> Self {
        RmsNormRun {
            x: normals(2 * 32 * 64, seed),
            gamma: vec![1.0; 64],
            y: vec![0.0; 2 * 32 * 64],
            inv_rms: vec![0.0; 64],
        }
    }
}

impl Runner for RmsNormRun {
    fn run(&mut self) -> Result<()> {
        let eps = ModelConfig::default_rms_norm_eps() as f32;
        layers::rmsnorm_forward(&mut self.y, &mut self.inv_rms, &self.x, &self.gamma, eps);
        Ok(())
    }
    fn output(&mut self) -> Vec<f32> {
        self.y.clone()
    }
}

struct ColdRun {
    seed: u64,
    logits: Vec<f32>,
}

impl Runner for ColdRun {
    fn run(&mut self) -> Result<()> {
        let mut model = Model::new(ModelConfig::tiny(), self.seed)?;
        let batch = inputs(1, 8)?;
        self.logits = model.forward(&batch.ids, 1)?.to_vec();
        Ok(())
    }
    fn output(&mut self) -> Vec<f32> {
        self.logits.clone()
    }
}

/// `threads` runners run concurrently, one per thread: the first on the
/// calling thread, the others on threads of their own; each thread is pinned
/// to its own core while cores last. Between runs the threads spin (yielding
/// after a while) instead of sleeping: on a virtual machine a sleeping core
/// halts, and waking it again costs tens of microseconds — more than the
/// difference being measured on sub-millisecond runs.
struct Parallel {
    own: Box<dyn Runner + Send>,
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

/// What the threads of [`Parallel`] share.
#[derive(Default)]
struct Shared {
    /// Incremented to start a run.
    generation: AtomicU64,
    /// Helper threads done with the current run.
    finished: AtomicUsize,
    /// Set (with a new generation) to end the helpers.
    stop: AtomicBool,
    /// The first error a helper met.
    failed: Mutex<Option<String>>,
}

/// Spins until `done()` holds, yielding the core after the first thousand tries.
fn wait_until(done: impl Fn() -> bool) {
    for tries in 0u32.. {
        if done() {
            return;
        }
        if tries < 1000 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

impl Parallel {
    fn new(threads: usize, make: impl Fn(usize) -> Result<Box<dyn Runner + Send>>) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Shared::default());
        let mut handles = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            let mut runner = make(i)?;
            let shared = shared.clone();
            handles.push(std::thread::spawn(move || {
                pin_to_core(i % cores);
                let mut seen = 0;
                loop {
                    wait_until(|| shared.generation.load(Ordering::Acquire) != seen);
                    seen = shared.generation.load(Ordering::Acquire);
                    if shared.stop.load(Ordering::Acquire) {
                        return;
                    }
                    if let Err(e) = runner.run() {
                        *shared
                            .failed
                            .lock()
                            .expect("no thread panics while holding it") = Some(e.to_string());
                    }
                    shared.finished.fetch_add(1, Ordering::AcqRel);
                }
            }));
        }
        pin_to_core(0);
        Ok(Parallel {
            own: make(0)?,
            shared,
            handles,
        })
    }
}

/// Best effort: run the calling thread on `core` only.
fn pin_to_core(core: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    if set.set(core).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

impl Runner for Parallel {
    fn run(&mut self) -> Result<()> {
        self.shared.finished.store(0, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        let own = self.own.run();
        let helpers = self.handles.len();
        wait_until(|| self.shared.finished.load(Ordering::Acquire) == helpers);
        own?;
        match self
            .shared
            .failed
            .lock()
            .expect("no thread panics while holding it")
            .take()
        {
            Some(reason) => Err(MoeError::InvalidTraining(format!(
                "parallel runner failed: {reason}"
            ))),
            None => Ok(()),
        }
    }
    fn output(&mut self) -> Vec<f32> {
        self.own.output()
    }
}

impl Drop for Parallel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contracts_22_scenarios_and_the_large_batch_one_with_unique_ids() {
        let all = all();
        assert_eq!(all.len(), 23);
        assert_eq!(all[22].id, "train_large_batch");
        assert_eq!(all[22].threads(), 2);
        let mut ids: Vec<_> = all.iter().map(|s| s.id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 23);
    }

    #[test]
    fn flop_counts_match_the_contract() {
        let (tiny, small) = (ModelConfig::tiny(), ModelConfig::small());
        assert_eq!(forward_flops(&tiny, 2, 32), 37_093_376.0);
        assert_eq!(forward_flops(&tiny, 2, 8), 9_076_736.0);
        assert_eq!(train_flops(&tiny, 2, 8), 27_197_440.0);
        assert_eq!(forward_flops(&small, 2, 32), 481_820_672.0);
        assert_eq!(train_flops(&small, 2, 8), 358_875_136.0);
    }

    #[test]
    fn every_workload_runs_and_produces_finite_output() {
        // The scale axis runs the same workloads on the small model (and
        // train_large_batch at 4,096 tokens): minutes under emulation.
        for scenario in all().into_iter().filter(|s| s.axis != "scale") {
            let mut runner = scenario.prepare(42).unwrap();
            runner.run().unwrap();
            runner.run().unwrap();
            let out = runner.output();
            assert!(
                !out.is_empty() && out.iter().all(|v| v.is_finite()),
                "{}",
                scenario.id
            );
        }
    }
}
