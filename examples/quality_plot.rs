//! Validation bits/byte against wall-clock seconds for one or more training
//! runs, from their `summary.json` (its `evaluations`: the run's training
//! clock and validation figure at every evaluation), as one SVG.
//!
//! cargo run --release --example quality_plot -- OUT.svg LABEL=SUMMARY.json... [--target LABEL=BITS]...
//!
//! Each `--target` draws a dashed horizontal line (a goal to reach).

use std::error::Error;
use std::path::PathBuf;

use plotters::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Summary {
    evaluations: Vec<Evaluation>,
}

#[derive(Deserialize)]
struct Evaluation {
    seconds: f64,
    val_bits_per_byte: f64,
}

/// One curve: its label and its (seconds, bits/byte) points.
type Curve = (String, Vec<(f64, f64)>);

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((out, rest)) = args.split_first() else {
        return Err(
            "usage: quality_plot OUT.svg LABEL=SUMMARY.json... [--target LABEL=BITS]...".into(),
        );
    };
    let (mut curves, mut targets): (Vec<Curve>, Vec<(String, f64)>) = (Vec::new(), Vec::new());
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        if arg == "--target" {
            let spec = rest.next().ok_or("--target needs LABEL=BITS")?;
            let (label, bits) = spec.split_once('=').ok_or("--target needs LABEL=BITS")?;
            targets.push((label.to_string(), bits.parse()?));
            continue;
        }
        let (label, path) = arg
            .split_once('=')
            .ok_or("each run is LABEL=SUMMARY.json")?;
        let summary: Summary =
            serde_json::from_str(&std::fs::read_to_string(PathBuf::from(path))?)?;
        let points = summary
            .evaluations
            .iter()
            .map(|e| (e.seconds, e.val_bits_per_byte))
            .collect();
        curves.push((label.to_string(), points));
    }
    draw(out, &curves, &targets)?;
    println!("wrote {out}");
    Ok(())
}

fn draw(out: &str, curves: &[Curve], targets: &[(String, f64)]) -> Result<(), Box<dyn Error>> {
    let all = curves.iter().flat_map(|(_, p)| p.iter());
    let max_x = all.clone().map(|p| p.0).fold(1.0, f64::max) * 1.02;
    let ys = all.map(|p| p.1).chain(targets.iter().map(|t| t.1));
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let root = SVGBackend::new(out, (820, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Tiny Shakespeare: validation bits/byte against training time",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d((1.0..max_x).log_scale(), (lo - 0.05)..(hi + 0.05))?;
    chart
        .configure_mesh()
        .x_desc("wall-clock seconds of training (log scale)")
        .y_desc("validation bits per byte")
        .draw()?;
    for (i, (label, points)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    for (i, (label, bits)) in targets.iter().enumerate() {
        let color = Palette99::pick(curves.len() + i).to_rgba();
        let line = DashedLineSeries::new([(1.0, *bits), (max_x, *bits)], 6, 4, color.into());
        chart
            .draw_series(line)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
