//! `moe train`: train on a text file (or a built-in corpus) with progress,
//! validation, checkpoints, a metrics log and a loss curve.

use std::fs;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rosetta_moe::budget::TimeBudget;
use rosetta_moe::checkpoint::{self, STATE_FILE};
use rosetta_moe::data::{
    DataState, RunClock, TextData, WindowSampler, builtin_corpus, evenly_spaced_batches,
};
use rosetta_moe::{
    Batch, Model, ModelConfig, MoeError, Result, Tokenizer, TrainConfig, Trainer, kernels, memory,
};
use serde::Serialize;

use super::recipe::{self, Recipe};

/// File names a training run writes next to its checkpoint.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const METRICS_FILE: &str = "metrics.jsonl";
const PLOT_FILE: &str = "loss.svg";
const SUMMARY_FILE: &str = "summary.json";

/// Train the model on text: tokenizer, 90/10 split, random windows, AdamW.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Text file to train on [default: --corpus shakespeare, or a resumed
    /// run's own text].
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// A corpus compiled into the binary instead of --data: `shakespeare`
    /// (Tiny Shakespeare, 1.1 MB, the default) or `source` (this project's
    /// own documentation and source code).
    #[arg(long, value_name = "NAME", conflicts_with = "data",
          value_parser = clap::builder::PossibleValuesParser::new(["shakespeare", "source"]))]
    corpus: Option<String>,
    /// Preset (tiny, small) or path to a config JSON file [default: the
    /// recipe's model, or tiny].
    #[arg(long)]
    config: Option<String>,
    /// Take every setting not given as a flag from this recipe: a built-in
    /// one (shakespeare-90s, shakespeare-15min; see configs/) or a recipe
    /// JSON file [default: shakespeare-90s when training on Tiny Shakespeare
    /// with no --config or --init-from, else none].
    #[arg(long, value_name = "NAME|FILE", conflicts_with = "resume")]
    recipe: Option<String>,
    /// The recipe in effect, once resolved.
    #[arg(skip)]
    chosen: Option<(String, Recipe)>,
    /// Train until this step number [default: the recipe's, or 1000; with
    /// --time as many as fit; a resumed run: the end of its schedule].
    #[arg(long, conflicts_with = "time")]
    steps: Option<u64>,
    /// Train for this much wall time instead of a step count (15m, 90s, 1h30m):
    /// the warm-up + cosine schedule is fitted to the budget from the measured
    /// step rate and ends at its floor as the time runs out; the run then
    /// evaluates, saves and stops. The clock counts the training loop
    /// (evaluations and saves included, start-up not) over all of the run's
    /// sessions: --resume continues the same budget, and --time with --resume
    /// sets a new total for the run.
    #[arg(long, value_name = "DURATION", value_parser = parse_budget)]
    time: Option<std::time::Duration>,
    /// Length of the warm-up + cosine schedule [default: --steps of a new run;
    /// a resumed run keeps its own].
    #[arg(long, conflicts_with = "time")]
    schedule_steps: Option<u64>,
    /// Sequences per step, B [default: the recipe's, 8, or the resumed run's].
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence, S [default: the recipe's, 64, or the resumed run's].
    #[arg(long)]
    seq: Option<usize>,
    /// Peak learning rate [default: 1e-3, or the recipe's].
    #[arg(long)]
    lr: Option<f64>,
    /// Linear warm-up steps [default: the recipe's, or a tenth of the
    /// steps, at most 100; with --time, 100].
    #[arg(long)]
    warmup: Option<u64>,
    /// Output directory for checkpoints, metrics and the loss curve.
    #[arg(long, default_value = "run", conflicts_with = "resume")]
    out: PathBuf,
    /// Continue the run saved in this directory (bit-identical to never stopping).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Start from the weights and tokenizer of this checkpoint (ours or a
    /// Hugging Face Mixtral directory) with fresh optimizer state, instead of
    /// a random initialisation.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["resume", "config"])]
    init_from: Option<PathBuf>,
    /// Seed of the initialisation and of the window sampler.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Evaluate validation loss every N steps (N ≥ 1).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    eval_every: u64,
    /// Batches in one evaluation.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// Write a checkpoint every N steps, N ≥ 1 (and always at the start and the end).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    save_every: u64,
    #[command(flatten)]
    threads: super::ThreadsArg,
    /// Overwrite an output directory that holds another run.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    json: super::JsonArg,
    /// When stderr is not a terminal, print a plain progress line every N steps.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    log_every: u64,
    #[command(flatten)]
    hyper: HyperFlags,
    #[command(flatten)]
    shape: ShapeFlags,
}

/// CONTRACT §6 hyper-parameters of a new run [defaults: CONTRACT §6].
#[derive(Debug, clap::Args)]
struct HyperFlags {
    /// Floor of the cosine schedule as a fraction of --lr, in [0, 1] [default: 0.1].
    #[arg(long, conflicts_with = "resume")]
    min_lr_ratio: Option<f64>,
    /// AdamW decoupled weight decay (2-D weights only) [default: 0.1].
    #[arg(long, conflicts_with = "resume")]
    weight_decay: Option<f64>,
    /// Global gradient-norm clipping threshold, ≤ 0 disables [default: 1.0].
    #[arg(long, conflicts_with = "resume")]
    grad_clip: Option<f64>,
    /// AdamW first-moment decay β1 [default: 0.9].
    #[arg(long, conflicts_with = "resume")]
    beta1: Option<f64>,
    /// AdamW second-moment decay β2 [default: 0.95].
    #[arg(long, conflicts_with = "resume")]
    beta2: Option<f64>,
    /// AdamW denominator ε [default: 1e-8].
    #[arg(long, conflicts_with = "resume")]
    adam_eps: Option<f64>,
    /// Weight α of the load-balancing loss [default: 0.01].
    #[arg(long, conflicts_with = "resume")]
    aux_alpha: Option<f64>,
    /// Residual dropout rate p in [0, 1) on the attention and MoE outputs
    /// while training (a contract extension; 0 is the contract's model) [default: 0].
    #[arg(long, conflicts_with = "resume")]
    dropout: Option<f64>,
}

impl HyperFlags {
    /// `train` with every given flag applied.
    fn apply(&self, train: TrainConfig) -> TrainConfig {
        TrainConfig {
            min_lr_ratio: self.min_lr_ratio.unwrap_or(train.min_lr_ratio),
            weight_decay: self.weight_decay.unwrap_or(train.weight_decay),
            grad_clip: self.grad_clip.unwrap_or(train.grad_clip),
            beta1: self.beta1.unwrap_or(train.beta1),
            beta2: self.beta2.unwrap_or(train.beta2),
            eps: self.adam_eps.unwrap_or(train.eps),
            aux_loss_alpha: self.aux_alpha.unwrap_or(train.aux_loss_alpha),
            dropout: self.dropout.unwrap_or(train.dropout),
            ..train
        }
    }
}

/// Model shape flags: each overrides the --config preset or file.
#[derive(Debug, clap::Args)]
struct ShapeFlags {
    /// Transformer blocks.
    #[arg(long, conflicts_with = "resume")]
    layers: Option<usize>,
    /// Residual width h (head_dim follows as h / heads).
    #[arg(long, conflicts_with = "resume")]
    hidden: Option<usize>,
    /// Query heads H (head_dim follows as h / heads).
    #[arg(long, conflicts_with = "resume")]
    heads: Option<usize>,
    /// Key/value heads (1 = multi-query attention).
    #[arg(long, conflicts_with = "resume")]
    kv_heads: Option<usize>,
    /// Experts per MoE layer.
    #[arg(long, conflicts_with = "resume")]
    experts: Option<usize>,
    /// Experts each token is routed to.
    #[arg(long, conflicts_with = "resume")]
    top_k: Option<usize>,
    /// Hidden size of one SwiGLU expert.
    #[arg(long, conflicts_with = "resume")]
    ffn: Option<usize>,
    /// Vocabulary size (the tokenizer is trained to at most this many tokens).
    #[arg(long, conflicts_with = "resume")]
    vocab: Option<usize>,
}

impl ShapeFlags {
    fn any(&self) -> bool {
        [
            self.layers,
            self.hidden,
            self.heads,
            self.kv_heads,
            self.experts,
            self.top_k,
            self.ffn,
            self.vocab,
        ]
        .iter()
        .any(Option::is_some)
    }

    /// `config` with every given flag applied, validated.
    fn apply(&self, config: ModelConfig) -> Result<ModelConfig> {
        let (hidden, heads) = (
            self.hidden.unwrap_or(config.hidden_dim),
            self.heads.unwrap_or(config.n_heads),
        );
        let head_dim = if self.hidden.is_some() || self.heads.is_some() {
            hidden / heads.max(1)
        } else {
            config.head_dim
        };
        let shaped = ModelConfig {
            n_layers: self.layers.unwrap_or(config.n_layers),
            hidden_dim: hidden,
            n_heads: heads,
            head_dim,
            n_kv_heads: self.kv_heads.unwrap_or(config.n_kv_heads),
            n_experts: self.experts.unwrap_or(config.n_experts),
            top_k: self.top_k.unwrap_or(config.top_k),
            ffn_dim: self.ffn.unwrap_or(config.ffn_dim),
            vocab_size: self.vocab.unwrap_or(config.vocab_size),
            ..config
        };
        shaped.validate()?;
        Ok(shaped)
    }
}

/// `args` with every setting it leaves open taken from its recipe: the one
/// `--recipe` names, or for a new run on Tiny Shakespeare with no `--config`
/// or `--init-from`, the default recipe.
fn with_recipe(mut args: Args) -> Result<Args> {
    let on_shakespeare =
        args.data.is_none() && args.corpus.as_deref().is_none_or(|c| c == "shakespeare");
    let spec = match &args.recipe {
        Some(spec) => spec.as_str(),
        None if args.resume.is_none()
            && on_shakespeare
            && args.config.is_none()
            && args.init_from.is_none() =>
        {
            recipe::DEFAULT
        }
        None => return Ok(args),
    };
    let (name, recipe) = Recipe::load(spec)?;
    eprintln!("recipe {name}: {}", recipe.about);
    if args.steps.is_none() && args.time.is_none() {
        args.steps = recipe.steps;
        args.time = recipe.budget()?;
    }
    args.batch = args.batch.or(Some(recipe.batch));
    args.seq = args.seq.or(Some(recipe.seq));
    args.lr = args.lr.or(Some(recipe.lr));
    args.warmup = args.warmup.or(recipe.warmup);
    let hyper = &mut args.hyper;
    hyper.min_lr_ratio = hyper.min_lr_ratio.or(recipe.min_lr_ratio);
    hyper.weight_decay = hyper.weight_decay.or(recipe.weight_decay);
    hyper.grad_clip = hyper.grad_clip.or(recipe.grad_clip);
    hyper.beta2 = hyper.beta2.or(recipe.beta2);
    hyper.aux_alpha = hyper.aux_alpha.or(recipe.aux_alpha);
    hyper.dropout = hyper.dropout.or(recipe.dropout);
    args.chosen = Some((name, recipe));
    Ok(args)
}

/// `--time`: a humantime duration longer than zero.
pub fn parse_budget(text: &str) -> std::result::Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("the budget must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// Steps of a run given neither --steps nor --time.
const DEFAULT_STEPS: u64 = 1000;

/// One line of `metrics.jsonl`.
#[derive(Serialize, serde::Deserialize)]
struct Metrics {
    step: u64,
    loss: f32,
    ce: f32,
    aux: f32,
    grad_norm: f32,
    lr: f64,
    tokens_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    train_eval: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    val_loss: Option<f32>,
    /// The run's training clock after this step (and its evaluation).
    #[serde(default)]
    seconds: f64,
    /// How long this step's evaluation took.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    eval_seconds: Option<f64>,
}

/// The end-of-run report (`summary.json`).
#[derive(Serialize)]
struct Summary {
    /// The step the run reached.
    steps: u64,
    /// Wall time of this session's training loop.
    seconds: f64,
    /// The run's training clock at the end: every session's training loop.
    training_seconds: f64,
    /// What stopped the run: "steps" (--steps reached) or "time" (--time spent).
    stopped_by: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_budget: Option<BudgetReport>,
    tokens_per_sec: f64,
    train_loss: f32,
    val_loss: f32,
    val_bits_per_byte: f64,
    /// Threads the kernels used.
    threads: usize,
    /// The model's parameter count.
    parameters: usize,
    /// The recipe this session took its defaults from (`--recipe`).
    #[serde(skip_serializing_if = "Option::is_none")]
    recipe: Option<String>,
    checkpoint: PathBuf,
    /// Every evaluation of the run (earlier sessions' included), in order.
    evaluations: Vec<Evaluation>,
}

/// One evaluation in `summary.json`.
#[derive(Serialize)]
struct Evaluation {
    step: u64,
    /// The run's training clock when it was done.
    seconds: f64,
    val_loss: f32,
    val_bits_per_byte: f64,
    train_loss: Option<f32>,
    /// How long it took.
    eval_seconds: Option<f64>,
}

/// The time budget in `summary.json`.
#[derive(Serialize)]
struct BudgetReport {
    /// The run's budget of training clock.
    seconds: f64,
    /// What the clock counts and what a resume does with the budget.
    clock: &'static str,
    /// The schedule length the last estimate settled on (the last step).
    schedule_steps: u64,
}

const CLOCK_MEANING: &str = "wall time of the training loop (steps, evaluations, saves) summed over the run's sessions, start-up excluded; --resume continues the same budget, --resume with --time sets a new total";

/// When a run stops.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// At this step.
    Step(u64),
    /// When this many seconds of training clock are spent.
    Time(f64),
}

/// Everything a run needs, fresh or resumed.
struct Run {
    trainer: Trainer,
    data: TextData,
    sampler: WindowSampler,
    source: String,
    batch: usize,
    seq: usize,
    dir: PathBuf,
    until: Until,
    /// The run's training clock when this session began.
    clock_start: f64,
    /// The training clock now (as of the last step), saved with a timed run.
    clock: f64,
    /// This process's exclusive right to write `dir`.
    _lock: checkpoint::WriterLock,
}

/// Every argument is checked before anything is written: a bad option
/// leaves no directory, checkpoint or output behind.
pub fn run(args: Args) -> Result<()> {
    args.json.check()?;
    let args = with_recipe(args)?;
    args.threads.apply();
    let mut run = match &args.resume {
        Some(dir) => resume(&args, dir)?,
        None => {
            let (source, text) = read_text(&args, None)?;
            if args.time.is_none() {
                check_steps(args.steps.unwrap_or(DEFAULT_STEPS), 0)?;
            }
            let mut run = start(&args, source, &text)?;
            // Step 0 is a checkpoint too: a run killed at any moment resumes.
            let saving = Instant::now();
            save(&mut run, None)?;
            let save_secs = saving.elapsed().as_secs_f64();
            return train(&args, &mut run, Some(save_secs));
        }
    };
    train(&args, &mut run, None)
}

/// `--steps` must lie beyond the run's current step.
fn check_steps(steps: u64, step: u64) -> Result<()> {
    if steps <= step {
        return Err(MoeError::InvalidTraining(format!(
            "--steps {steps} but the run is already at step {step}"
        )));
    }
    Ok(())
}

/// The training text and a name for it: --data, --corpus, or else the
/// source `recorded` by a resumed run, or Tiny Shakespeare.
fn read_text(args: &Args, recorded: Option<&str>) -> Result<(String, Vec<u8>)> {
    let builtin = |name: &str| {
        builtin_corpus(name).map(|text| (format!("built-in:{name}"), text.as_bytes().to_vec()))
    };
    let path = match (&args.data, &args.corpus, recorded) {
        (Some(path), _, _) => path.clone(),
        (None, Some(name), _) => return Ok(builtin(name).expect("clap checks --corpus")),
        (None, None, None) => return Ok(builtin("shakespeare").expect("compiled in")),
        // The name of the source corpus before Tiny Shakespeare shipped.
        (None, None, Some("built-in")) => return Ok(builtin("source").expect("compiled in")),
        (None, None, Some(recorded)) => {
            if let Some(text) = recorded.strip_prefix("built-in:").and_then(builtin) {
                return Ok(text);
            }
            PathBuf::from(recorded)
        }
    };
    let text = fs::read(&path).map_err(|e| MoeError::io(&path, e))?;
    if text.is_empty() {
        return Err(MoeError::EmptyInput("data file"));
    }
    Ok((path.display().to_string(), text))
}

fn start(args: &Args, source: String, text: &[u8]) -> Result<Run> {
    let initial = args.init_from.as_deref().map(initial_model).transpose()?;
    let config = match &initial {
        Some((model, _)) => model.config().clone(),
        None => args.shape.apply(match (&args.config, &args.chosen) {
            (None, Some((_, recipe))) => recipe.model.clone(),
            (spec, _) => ModelConfig::from_preset_or_file(spec.as_deref().unwrap_or("tiny"))?,
        })?,
    };
    if initial.is_some() && args.shape.any() {
        return Err(MoeError::InvalidConfig(
            "shape flags cannot change a model loaded by --init-from".into(),
        ));
    }
    let (batch, seq) = (args.batch.unwrap_or(8), args.seq.unwrap_or(64));
    check_shape(&config, batch, seq)?;
    let (until, warmup, total) = match args.time {
        Some(budget) => {
            let warmup = args.warmup.unwrap_or(100);
            // Refitted to the budget once the step rate is measured.
            (
                Until::Time(budget.as_secs_f64()),
                warmup,
                (10 * warmup).max(1000),
            )
        }
        None => {
            let steps = args.steps.unwrap_or(DEFAULT_STEPS);
            let warmup = args.warmup.unwrap_or((steps / 10).clamp(1, 100));
            (
                Until::Step(steps),
                warmup,
                args.schedule_steps.unwrap_or(steps),
            )
        }
    };
    let train = TrainConfig {
        lr: args.lr.unwrap_or(1e-3),
        warmup_steps: warmup,
        total_steps: total,
        seed: args.seed,
        ..args.hyper.apply(TrainConfig::default())
    };
    train.validate()?;
    check_free(&args.out, args.force)?;
    // An existing directory is locked at once (another run may hold it); a
    // new one is created only once the tokenizer, data and model are built.
    let early_lock = args
        .out
        .is_dir()
        .then(|| checkpoint::lock(&args.out))
        .transpose()?;
    if early_lock.is_some() {
        // Again under the lock: a run that held it may have saved meanwhile.
        if check_free(&args.out, args.force)? {
            eprintln!(
                "note: {} holds no checkpoint yet (an earlier start was stopped before step 0 was saved, so nothing was trained): starting afresh",
                args.out.display()
            );
        }
    }
    let (model, tokenizer) = match initial {
        Some(initial) => initial,
        None => {
            let spinner = super::progress(0, "{spinner} training a {msg}-token BPE tokenizer…");
            spinner.set_message(config.vocab_size.to_string());
            spinner.enable_steady_tick(std::time::Duration::from_millis(120));
            let tokenizer = Tokenizer::train(text, config.vocab_size)?;
            spinner.finish_and_clear();
            (Model::new(config, args.seed)?, tokenizer)
        }
    };
    let data = TextData::new(text, &tokenizer, seq)?;
    let sampler = WindowSampler::new(train.seed);
    let trainer = Trainer::new(model, train)?;
    fs::create_dir_all(&args.out).map_err(|e| MoeError::io(&args.out, e))?;
    let lock = match early_lock {
        Some(lock) => lock,
        None => checkpoint::lock(&args.out)?,
    };
    checkpoint::recover(&args.out)?;
    tokenizer.save(&args.out.join(TOKENIZER_FILE))?;
    fs::write(args.out.join(METRICS_FILE), "").map_err(|e| MoeError::io(&args.out, e))?;
    Ok(Run {
        trainer,
        data,
        sampler,
        source,
        batch,
        seq,
        dir: args.out.clone(),
        until,
        clock_start: 0.0,
        clock: 0.0,
        _lock: lock,
    })
}

/// Refuses an output directory that holds anything but what an interrupted
/// start-up leaves, unless `force`. True when it holds such remains (which
/// the new run replaces: they hold nothing trained).
fn check_free(dir: &Path, force: bool) -> Result<bool> {
    if !force && holds_no_checkpoint_yet(dir) {
        return Ok(true);
    }
    super::ensure_fresh_dir(dir, force)?;
    Ok(false)
}

/// The uncommitted save of `checkpoint::save_training` (see its transaction).
const STAGING_DIR: &str = ".checkpoint-new";

/// True when `dir` holds only what `moe train` writes during its start-up,
/// before its step-0 checkpoint commits: the lock file and, beside it, the
/// tokenizer, an empty metrics log, atomic-write temporaries and an
/// uncommitted save. Nothing trained is in such a directory (no checkpoint,
/// no metrics), so starting afresh in it loses nothing. The lock file is
/// required: `moe train` takes it before writing anything else, so a
/// directory without it was not left by a start-up.
fn holds_no_checkpoint_yet(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let mut locked = false;
    for entry in entries {
        let Ok(entry) = entry else {
            return false;
        };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match &*name {
            rosetta_moe::error::LOCK_FILE => locked = true,
            TOKENIZER_FILE | STAGING_DIR => {}
            METRICS_FILE if entry.metadata().is_ok_and(|m| m.len() == 0) => {}
            // `tempfile`'s names: half-written tokenizer or metrics files.
            other if other.starts_with(".tmp") => {}
            _ => return false,
        }
    }
    locked
}

/// The model and tokenizer of `--init-from DIR`.
fn initial_model(dir: &Path) -> Result<(Model, Tokenizer)> {
    let model = rosetta_moe::hf::load_model(dir)?;
    let tokenizer = checkpoint_tokenizer(dir, model.config().vocab_size)?;
    Ok((model, tokenizer))
}

/// The tokenizer saved with a checkpoint; its tokens must fit the model's vocabulary.
fn checkpoint_tokenizer(dir: &Path, vocab_size: usize) -> Result<Tokenizer> {
    let path = dir.join(TOKENIZER_FILE);
    let tokenizer = Tokenizer::load(&path)?;
    if tokenizer.vocab_size() > vocab_size {
        return Err(MoeError::checkpoint(
            &path,
            format!(
                "{} tokens do not fit the model's vocab_size {vocab_size}",
                tokenizer.vocab_size()
            ),
        ));
    }
    Ok(tokenizer)
}

fn resume(args: &Args, dir: &Path) -> Result<Run> {
    let lock = checkpoint::lock(dir)?;
    checkpoint::recover(dir)?;
    if holds_no_checkpoint_yet(dir) {
        // Its settings were never saved: guessing them would train another run.
        return Err(MoeError::checkpoint(
            dir,
            "holds no checkpoint yet: its run was stopped during start-up, before step 0 was saved, so nothing was trained; start it again with the `moe train --out` command that made it (no --force needed)",
        ));
    }
    let (mut trainer, state) = checkpoint::load_training(dir)?;
    let clock = state.data.as_ref().and_then(|d| d.clock);
    let until = match (clock, args.time) {
        (Some(clock), time) => {
            if let Some(steps) = args.steps {
                return Err(MoeError::InvalidTraining(format!(
                    "--steps {steps}: the run trains for a time budget; extend it with --time"
                )));
            }
            let budget = time.map_or(clock.budget_secs, |t| t.as_secs_f64());
            // A run that stopped at its budget ended its schedule there.
            let finished = time.is_none() && trainer.step() >= trainer.config().total_steps;
            if finished || clock.elapsed_secs >= budget {
                return Err(MoeError::InvalidTraining(format!(
                    "the run has already used {:.1} s of its {budget:.1} s budget; give a longer --time",
                    clock.elapsed_secs
                )));
            }
            Until::Time(budget)
        }
        (None, Some(_)) => {
            return Err(MoeError::InvalidTraining(
                "--time: the run counts steps; continue it with --steps".into(),
            ));
        }
        (None, None) => {
            // Without --steps, a run continues to the end of its schedule.
            let steps = args.steps.unwrap_or(trainer.config().total_steps);
            check_steps(steps, trainer.step())?;
            Until::Step(steps)
        }
    };
    if let Some(total) = args.schedule_steps {
        let mut schedule = trainer.config().clone();
        schedule.total_steps = total;
        trainer.set_config(schedule)?;
    }
    let config = trainer.model().config().clone();
    let not_a_run =
        || MoeError::checkpoint(dir.join(STATE_FILE), "no data state: not a `moe train` run");
    let data_state = state.data.ok_or_else(not_a_run)?;
    if let Some(spec) = &args.config {
        let wanted = ModelConfig::from_preset_or_file(spec)?;
        if wanted != config {
            return Err(MoeError::checkpoint(
                dir,
                format!("the run's config differs from --config {spec}"),
            ));
        }
    }
    for (flag, given, saved) in [
        ("--batch", args.batch, data_state.batch_size),
        ("--seq", args.seq, data_state.seq_len),
    ] {
        if given.is_some_and(|g| g != saved) {
            return Err(MoeError::checkpoint(
                dir,
                format!("the run used {flag} {saved}; it cannot change on resume"),
            ));
        }
    }
    let tokenizer = checkpoint_tokenizer(dir, config.vocab_size)?;
    let (source, text) = read_text(args, Some(&data_state.source))?;
    let data = TextData::new(&text, &tokenizer, data_state.seq_len)?;
    if data.fingerprint != data_state.fingerprint {
        return Err(MoeError::checkpoint(
            dir,
            format!(
                "the run trained on {} (another text than {source}); pass the same --data or --corpus",
                data_state.source
            ),
        ));
    }
    let last_clock = truncate_metrics(&dir.join(METRICS_FILE), state.step)?;
    let clock = clock.map_or(last_clock, |c| c.elapsed_secs);
    Ok(Run {
        trainer,
        data,
        sampler: WindowSampler::resume(data_state.rng),
        source,
        batch: data_state.batch_size,
        seq: data_state.seq_len,
        dir: dir.to_path_buf(),
        until,
        clock_start: clock,
        clock,
        _lock: lock,
    })
}

/// B and S must suit the model, and training them must fit in memory:
/// weights, gradients, two moments and the activations of one step.
fn check_shape(config: &ModelConfig, batch: usize, seq: usize) -> Result<()> {
    if batch == 0 || seq == 0 {
        return Err(MoeError::EmptyInput("--batch and --seq must be > 0"));
    }
    if seq > config.max_seq_len {
        return Err(MoeError::SequenceTooLong {
            len: seq,
            max: config.max_seq_len,
        });
    }
    let need = config
        .activation_bytes(batch, seq, seq, true)
        .and_then(|a| a.checked_add(config.model_bytes().checked_mul(4)?));
    memory::ensure_fits(
        || format!("training {batch} × {seq} tokens per step"),
        need,
        " (lower --batch or --seq)",
    )
}

/// Keeps the metrics of steps ≤ `step` (later ones were not checkpointed);
/// returns the training clock of the last one kept.
fn truncate_metrics(path: &Path, step: u64) -> Result<f64> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut clock = 0.0;
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<Metrics>(line).is_ok_and(|m| {
                clock = if m.step <= step { m.seconds } else { clock };
                m.step <= step
            })
        })
        .map(|line| format!("{line}\n"))
        .collect();
    rosetta_moe::atomic_write::write_atomic(path, kept.as_bytes())?;
    Ok(clock)
}

/// Mean cross-entropy over `batches` (nats/token).
fn evaluate(model: &mut Model, batches: &[Batch]) -> Result<f32> {
    let mut sum = 0.0;
    for batch in batches {
        sum += model.losses(batch, 0.0)?.ce;
    }
    Ok(sum / batches.len() as f32)
}

/// Saves the run's checkpoint; with `trained_on` (a batch of this run's
/// training data) only after the weights pass the divergence rule on it, so
/// that a diverged model never replaces the last good checkpoint.
fn save(run: &mut Run, trained_on: Option<&Batch>) -> Result<()> {
    if let Some(batch) = trained_on {
        run.trainer.check_weights(batch)?;
    }
    let state = DataState {
        source: run.source.clone(),
        fingerprint: run.data.fingerprint.clone(),
        batch_size: run.batch,
        seq_len: run.seq,
        rng: run.sampler.state(),
        clock: match run.until {
            Until::Time(budget) => Some(RunClock {
                budget_secs: budget,
                elapsed_secs: run.clock,
            }),
            Until::Step(_) => None,
        },
    };
    checkpoint::save_training(&run.trainer, Some(&state), &run.dir)
}

/// `resume` for the interruption message: how to continue this run.
fn continue_hint(run: &Run) -> String {
    let until = match run.until {
        Until::Step(steps) => format!(" --steps {steps}"),
        Until::Time(_) => String::new(),
    };
    format!("moe train --resume {}{until}", run.dir.display())
}

/// `save_secs`: how long the step-0 save took (a new run).
fn train(args: &Args, run: &mut Run, save_secs: Option<f64>) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    // Best effort: without a handler Ctrl-C still stops the run, just unsaved.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));

    let (b, s) = (run.batch, run.seq);
    let val_batches = evenly_spaced_batches(&run.data.val, b, s, args.eval_batches)?;
    let train_eval_batches = evenly_spaced_batches(&run.data.train, b, s, args.eval_batches)?;
    let mut batch = Batch::new(vec![0; b * s], vec![0; b * s], b)?;
    let first = run.trainer.step() + 1;
    // A step bar, or for a timed run a bar of the budget's milliseconds.
    // At most 80 columns: 20 + 1 + message (≤ 46) + 1 + "12:34<56:07" (11).
    let bar = super::progress(
        match run.until {
            Until::Step(steps) => steps - run.trainer.step(),
            Until::Time(budget) => ((budget - run.clock_start) * 1000.0) as u64,
        },
        "{bar:20} {msg} {elapsed}<{eta}",
    );
    let terminal = std::io::stderr().is_terminal();
    let mut metrics = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(run.dir.join(METRICS_FILE))
        .map_err(|e| MoeError::io(run.dir.join(METRICS_FILE), e))?;
    let mut budget = match run.until {
        Until::Time(seconds) => Some(TimeBudget::new(seconds)),
        Until::Step(_) => None,
    };
    let (mut last_eval_secs, mut last_save_secs) = (None::<f64>, save_secs);
    let start = Instant::now();
    let clock_start = run.clock_start;
    let clock = |start: &Instant| clock_start + start.elapsed().as_secs_f64();
    let mut window = Instant::now();
    let (mut smoothed, mut last_val, mut last_train_eval) = (None::<f32>, None::<f32>, None::<f32>);
    loop {
        let step = run.trainer.step() + 1;
        if interrupted.load(Ordering::SeqCst) {
            bar.finish_and_clear();
            save(run, (step > first).then_some(&batch))?;
            eprintln!(
                "interrupted: checkpoint at step {} saved in {}; continue with `{}`",
                run.trainer.step(),
                run.dir.display(),
                continue_hint(run),
            );
            std::process::exit(130);
        }
        let reserve = |budget: &TimeBudget| {
            rosetta_moe::budget::reserve(
                last_eval_secs,
                last_save_secs,
                args.eval_batches,
                budget.seconds_per_step(),
            )
        };
        if let Some(budget) = &budget {
            // Fit the schedule to the time left (it ends at the last step that fits).
            let current = run.trainer.config().total_steps;
            let total_steps =
                budget.schedule_for_next(step - 1, clock(&start), reserve(budget), current);
            if total_steps != current {
                let mut schedule = run.trainer.config().clone();
                schedule.total_steps = total_steps;
                run.trainer.set_config(schedule)?;
            }
        }
        run.sampler.fill(&mut batch, &run.data.train);
        let stats = match run.trainer.train_step(&batch) {
            Ok(stats) => stats,
            Err(e) => {
                bar.abandon();
                // A refused non-finite step left finite weights: keep the
                // steps since the last save. A diverged run saves nothing.
                if matches!(e, MoeError::NonFinite { .. }) {
                    save(run, (step > first).then_some(&batch))?;
                }
                return Err(e);
            }
        };
        let tokens_per_sec = (b * s) as f64 / window.elapsed().as_secs_f64();
        window = Instant::now();
        run.clock = clock(&start);
        let last = match (&mut budget, run.until) {
            (Some(budget), _) => {
                budget.record(step, run.clock);
                let reserve = reserve(budget);
                let current = run.trainer.config().total_steps;
                budget.ends_after(step, run.clock, reserve, current)
            }
            (None, Until::Step(steps)) => step == steps,
            (None, Until::Time(_)) => unreachable!("a timed run has a budget"),
        };
        let (mut val_loss, mut train_eval, mut eval_seconds) = (None, None, None);
        if step.is_multiple_of(args.eval_every) || last {
            let evaluating = Instant::now();
            val_loss = Some(evaluate(run.trainer.model_mut(), &val_batches)?);
            train_eval = Some(evaluate(run.trainer.model_mut(), &train_eval_batches)?);
            (last_val, last_train_eval) = (val_loss, train_eval);
            let took = evaluating.elapsed().as_secs_f64();
            (eval_seconds, last_eval_secs) = (Some(took), Some(took));
            run.clock = clock(&start);
        }
        let line = Metrics {
            step,
            loss: stats.loss,
            ce: stats.ce,
            aux: stats.aux,
            grad_norm: stats.grad_norm,
            lr: stats.lr,
            tokens_per_sec,
            train_eval,
            val_loss,
            seconds: run.clock,
            eval_seconds,
        };
        let json = serde_json::to_string(&line).expect("metrics serialise");
        writeln!(metrics, "{json}").map_err(|e| MoeError::io(run.dir.join(METRICS_FILE), e))?;
        let ema = smoothed.map_or(stats.loss, |m| 0.95 * m + 0.05 * stats.loss);
        smoothed = Some(ema);
        let val = last_val.map_or("-".into(), |v| format!("{v:.3}"));
        let of = match run.until {
            Until::Step(steps) => steps.to_string(),
            Until::Time(_) => format!("~{}", run.trainer.config().total_steps),
        };
        bar.set_message(format!(
            "{step}/{of} loss {ema:.3} val {val} {tokens_per_sec:.0} tok/s"
        ));
        match run.until {
            Until::Step(_) => bar.inc(1),
            Until::Time(_) => bar.set_position(((run.clock - run.clock_start) * 1000.0) as u64),
        }
        if !terminal && (step.is_multiple_of(args.log_every) || last) {
            let eta = match run.until {
                Until::Step(_) => bar.eta().as_secs_f64(),
                Until::Time(budget) => (budget - run.clock).max(0.0),
            };
            eprintln!(
                "step {step}/{of} loss {ema:.3} val {val} {tokens_per_sec:.0} tok/s ETA {eta:.0} s"
            );
        }
        if last {
            break;
        }
        if step.is_multiple_of(args.save_every) {
            let saving = Instant::now();
            save(run, Some(&batch))?;
            last_save_secs = Some(saving.elapsed().as_secs_f64());
        }
    }
    bar.finish_and_clear();
    if budget.is_some() {
        // The schedule ended here (the estimate before the last step may
        // have been a step or two longer).
        let mut schedule = run.trainer.config().clone();
        schedule.total_steps = run.trainer.step();
        run.trainer.set_config(schedule)?;
    }
    run.clock = clock(&start);
    save(run, Some(&batch))?;
    let seconds = start.elapsed().as_secs_f64();
    let (train_loss, val_loss) = (
        last_train_eval.unwrap_or(f32::NAN),
        last_val.unwrap_or(f32::NAN),
    );
    let bytes_per_token = run.data.val_bytes as f64 / run.data.val.len() as f64;
    let bits = |loss: f32| f64::from(loss) / std::f64::consts::LN_2 / bytes_per_token;
    let step = run.trainer.step();
    let summary = Summary {
        steps: step,
        seconds,
        training_seconds: run.clock,
        stopped_by: match run.until {
            Until::Step(_) => "steps",
            Until::Time(_) => "time",
        },
        time_budget: match run.until {
            Until::Time(seconds) => Some(BudgetReport {
                seconds,
                clock: CLOCK_MEANING,
                schedule_steps: run.trainer.config().total_steps,
            }),
            Until::Step(_) => None,
        },
        tokens_per_sec: ((step + 1 - first) as usize * b * s) as f64 / seconds,
        train_loss,
        val_loss,
        val_bits_per_byte: bits(val_loss),
        threads: kernels::threads(),
        parameters: run.trainer.model().config().param_count(),
        recipe: args.chosen.as_ref().map(|(name, _)| name.clone()),
        checkpoint: run.dir.clone(),
        evaluations: read_metrics(&run.dir.join(METRICS_FILE))?
            .into_iter()
            .filter_map(|m| {
                Some(Evaluation {
                    step: m.step,
                    seconds: m.seconds,
                    val_loss: m.val_loss?,
                    val_bits_per_byte: bits(m.val_loss?),
                    train_loss: m.train_eval,
                    eval_seconds: m.eval_seconds,
                })
            })
            .collect(),
    };
    super::write_json(&run.dir.join(SUMMARY_FILE), &summary)?;
    plot(&run.dir.join(METRICS_FILE), &run.dir.join(PLOT_FILE))?;
    args.json.say(format_args!(
        "trained steps {first}–{step} on {} ({} train / {} val tokens) in {:.1} s, {:.0} tokens/s",
        run.source,
        run.data.train.len(),
        run.data.val.len(),
        seconds,
        summary.tokens_per_sec
    ));
    if let Until::Time(budget) = run.until {
        args.json.say(format_args!(
            "time budget {budget:.1} s: {:.1} s used (the schedule ended at step {step})",
            run.clock
        ));
    }
    args.json.say(format_args!(
        "train loss {train_loss:.3} nats/token   val loss {val_loss:.3} nats/token = {:.3} bits/byte",
        summary.val_bits_per_byte
    ));
    args.json.say(format_args!(
        "checkpoint, metrics.jsonl and loss.svg in {d}/ — sample with: moe generate --checkpoint {d} --prompt \"...\"",
        d = run.dir.display()
    ));
    args.json.emit(&summary)
}

/// The lines of `metrics.jsonl` (lines that do not parse are skipped).
fn read_metrics(path: &Path) -> Result<Vec<Metrics>> {
    let text = fs::read_to_string(path).map_err(|e| MoeError::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Draws the training and validation loss curves of `metrics.jsonl` as an SVG.
fn plot(metrics: &Path, out: &Path) -> Result<()> {
    use plotters::prelude::*;
    let lines = read_metrics(metrics)?;
    let train: Vec<(u64, f64)> = lines.iter().map(|m| (m.step, f64::from(m.ce))).collect();
    let val: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|m| m.val_loss.map(|v| (m.step, f64::from(v))))
        .collect();
    let max_step = train.last().map_or(1, |p| p.0.max(1));
    let max_loss = train.iter().chain(&val).map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let tmp = out.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&tmp, (800, 480)).into_drawing_area();
        let draw = |e: String| MoeError::io(out, std::io::Error::other(e));
        root.fill(&WHITE).map_err(|e| draw(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("rosetta-moe training loss", ("sans-serif", 20))
            .margin(12)
            .margin_right(super::legend::MARGIN)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0..max_step, 0.0..max_loss.max(1e-3))
            .map_err(|e| draw(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("cross-entropy (nats/token)")
            .draw()
            .map_err(|e| draw(e.to_string()))?;
        let (train_color, val_color) = (BLUE.mix(0.6), RED.to_rgba());
        chart
            .draw_series(LineSeries::new(train, train_color))
            .map_err(|e| draw(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(val, val_color.stroke_width(2)))
            .map_err(|e| draw(e.to_string()))?;
        // The legend sits in the right margin, outside the data.
        let legend = [("train (per step)", train_color), ("validation", val_color)];
        super::legend::draw(&root, 60, &legend).map_err(draw)?;
        root.present().map_err(|e| draw(e.to_string()))?;
    }
    fs::rename(&tmp, out).map_err(|e| MoeError::io(out, e))
}
