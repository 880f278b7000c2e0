//! `moe dump`: every intermediate the reference checks, for one batch.

use std::path::PathBuf;

use rosetta_moe::optim::AdamW;
use rosetta_moe::{Batch, MoeError, Result, TrainConfig, Trainer};
use rosetta_moe::{checkpoint, hf};
use safetensors::tensor::{Dtype, TensorView};

/// Write logits, losses, every gradient, the routing and the weights after
/// one AdamW step for one batch, as a safetensors file.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint directory (config.json + model.safetensors).
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    checkpoint: Option<PathBuf>,
    /// A training checkpoint instead: the AdamW step continues its moments and
    /// step count (t = its step + 1); the moments before the step are written
    /// as `m.<name>` / `v.<name>`, those after it as `m_after.<name>` /
    /// `v_after.<name>`.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Batch as JSON: {"ids": [[...]], "targets": [[...]]}.
    #[arg(long)]
    batch: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Step number t of the one AdamW step (fresh moments; sets lr and bias
    /// correction); ignored with --resume.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    step: u64,
    /// Training settings (JSON with CONTRACT §6 keys); defaults otherwise.
    #[arg(long, value_name = "FILE")]
    train: Option<PathBuf>,
}

/// One tensor to write: name, shape, little-endian bytes and dtype.
struct Entry {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    bytes: Vec<u8>,
}

impl Entry {
    fn f32(name: String, shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = bytemuck::cast_slice(values).to_vec();
        Entry {
            name,
            shape,
            dtype: Dtype::F32,
            bytes,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let batch = Batch::load(&args.batch)?;
    let (mut model, optimizer, step, saved_train) = match (&args.resume, &args.checkpoint) {
        (Some(dir), _) => {
            let (trainer, state) = checkpoint::load_training(dir)?;
            let optimizer = trainer.optimizer().clone();
            (
                trainer.into_model(),
                Some(optimizer),
                state.step + 1,
                Some(state.train),
            )
        }
        (None, Some(dir)) => (hf::load_model(dir)?, None, args.step, None),
        (None, None) => return Err(MoeError::EmptyInput("--checkpoint or --resume")),
    };
    let train = match (&args.train, saved_train) {
        (Some(path), _) => TrainConfig::load(path)?,
        (None, Some(saved)) => saved,
        (None, None) => TrainConfig::default(),
    };
    let config = model.config().clone();
    let layout = model.layout().clone();
    let (b, s, v, k) = (
        batch.batch_size,
        batch.seq_len,
        config.vocab_size,
        config.top_k,
    );

    let mut grads = vec![0.0; layout.len];
    let (losses, _) = model.loss_and_grads(&batch, train.aux_loss_alpha as f32, &mut grads)?;
    if !model.logits().iter().all(|z| z.is_finite()) {
        return Err(MoeError::NonFiniteValue { what: "logits" });
    }
    let mut entries = vec![
        Entry::f32("logits".into(), vec![b, s, v], model.logits()),
        Entry::f32("loss.ce".into(), vec![1], &[losses.ce]),
        Entry::f32("loss.aux".into(), vec![1], &[losses.aux]),
        Entry::f32("loss.total".into(), vec![1], &[losses.total()]),
    ];
    for l in 0..config.n_layers {
        let routes = model
            .routes(l)
            .expect("every layer routes in a training forward");
        let as_i32: Vec<i32> = routes.iter().map(|&e| e as i32).collect();
        entries.push(Entry {
            name: format!("route.{l}"),
            shape: vec![b * s, k],
            dtype: Dtype::I32,
            bytes: bytemuck::cast_slice(&as_i32).to_vec(),
        });
    }
    // Every tensor of a flat parameter-layout buffer as `<prefix>.<name>`.
    let per_tensor = |entries: &mut Vec<Entry>, prefix: &str, flat: &[f32]| {
        for spec in &layout.tensors {
            let name = format!("{prefix}.{}", spec.name);
            entries.push(Entry::f32(
                name,
                spec.shape.clone(),
                &flat[spec.range.clone()],
            ));
        }
    };
    per_tensor(&mut entries, "grad", &grads);

    let resumed = optimizer.is_some();
    if let Some(opt) = &optimizer {
        per_tensor(&mut entries, "m", &opt.m);
        per_tensor(&mut entries, "v", &opt.v);
    }
    let optimizer = optimizer.unwrap_or_else(|| AdamW::new(&layout));
    let mut trainer = Trainer::resume(model, train, optimizer, step - 1)?;
    let stats = trainer.train_step(&batch)?;
    per_tensor(&mut entries, "after", trainer.model().params());
    if resumed {
        per_tensor(&mut entries, "m_after", &trainer.optimizer().m);
        per_tensor(&mut entries, "v_after", &trainer.optimizer().v);
    }

    let views = entries.iter().map(|e| {
        let view =
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes).expect("shape matches bytes");
        (e.name.clone(), view)
    });
    safetensors::serialize_to_file(views, None, &args.out)
        .map_err(|e| MoeError::io(&args.out, std::io::Error::other(e.to_string())))?;
    println!(
        "wrote {}: loss {:.6} (ce {:.6}, aux {:.6}), grad norm {:.6}, lr {:.3e} at step {}",
        args.out.display(),
        losses.total(),
        losses.ce,
        losses.aux,
        stats.grad_norm,
        stats.lr,
        step
    );
    Ok(())
}
