//! `moe convergence`: the convergence check of CONTRACT §11.

use rosetta_moe::Result;
use rosetta_moe::train::{CONVERGENCE_STEPS, convergence_setup};

/// Train the tiny model on one fixed batch (CONTRACT §11) and report the losses.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of steps.
    #[arg(long, default_value_t = CONVERGENCE_STEPS)]
    steps: usize,
    #[command(flatten)]
    json: super::JsonArg,
}

/// The `--json` report: every step's losses and the final ones.
#[derive(serde::Serialize)]
struct Report<'a> {
    steps: usize,
    losses: &'a [f32],
    ce: &'a [f32],
    aux: &'a [f32],
    final_loss: f32,
    final_ce: f32,
    final_aux: f32,
}

pub fn run(args: Args) -> Result<()> {
    args.json.check()?;
    let (mut trainer, batch) = convergence_setup()?;
    let bar = super::progress(
        args.steps as u64,
        "{bar:40} {pos}/{len} steps  loss {msg}  [{elapsed_precise} < {eta}]",
    );
    let (mut losses, mut ce, mut aux) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.steps {
        let stats = trainer.train_step(&batch)?;
        losses.push(stats.loss);
        ce.push(stats.ce);
        aux.push(stats.aux);
        bar.set_message(format!("{:.4}", stats.loss));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (Some(first), Some(last)) = (losses.first(), losses.last()) else {
        args.json.say(format_args!("0 steps: nothing to report"));
        return Ok(());
    };
    let n = losses.len() - 1;
    let say = |line: String| args.json.say(format_args!("{line}"));
    say(format!(
        "convergence check: tiny model, seed 42, batch 2×8, {} steps",
        losses.len()
    ));
    say(format!(
        "            {:>10} {:>10} {:>10}",
        "total", "ce", "aux"
    ));
    say(format!(
        "initial     {first:>10.4} {:>10.4} {:>10.4}",
        ce[0], aux[0]
    ));
    say(format!(
        "final       {last:>10.4} {:>10.4} {:>10.4}",
        ce[n], aux[n]
    ));
    args.json.emit(&Report {
        steps: losses.len(),
        final_loss: *last,
        final_ce: ce[n],
        final_aux: aux[n],
        losses: &losses,
        ce: &ce,
        aux: &aux,
    })
}
