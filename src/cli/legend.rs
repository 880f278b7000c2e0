//! Plot legends drawn in a chart's right margin, outside the data.

use plotters::coord::Shift;
use plotters::prelude::*;

/// Width of the right margin a chart leaves for [`draw`].
pub const MARGIN: u32 = 170;

/// One legend row per (label, colour) — a short line and its label — in the
/// right margin of `root` (whose chart was built with `margin_right(MARGIN)`),
/// starting `top` pixels down.
pub fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    top: i32,
    entries: &[(&str, RGBAColor)],
) -> Result<(), String> {
    let x = root.dim_in_pixel().0 as i32 - MARGIN as i32 + 10;
    for (i, (label, color)) in entries.iter().enumerate() {
        let y = top + 22 * i as i32;
        let line = PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2));
        root.draw(&line).map_err(|e| e.to_string())?;
        let text = Text::new(label.to_string(), (x + 27, y - 6), ("sans-serif", 13));
        root.draw(&text).map_err(|e| e.to_string())?;
    }
    Ok(())
}
