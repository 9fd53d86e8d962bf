//! SVG charts: the size-versus-quality Pareto plot of `report` and the loss curves of `finetune`.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// A labelled point of a scatter plot.
#[derive(Debug, Clone)]
pub struct Point {
    /// Label drawn next to the point.
    pub label: String,
    /// x value.
    pub x: f64,
    /// y value.
    pub y: f64,
}

fn range(v: impl Iterator<Item = f64> + Clone, pad: f64) -> (f64, f64) {
    let lo = v.clone().fold(f64::INFINITY, f64::min);
    let hi = v.fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).abs().max(1e-9);
    (lo - pad * span, hi + pad * span)
}

/// Indices of the points no other point beats on both axes (smaller x, larger y).
pub fn pareto_front(points: &[Point]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..points.len())
        .filter(|&i| {
            !points.iter().any(|q| {
                q.x <= points[i].x && q.y >= points[i].y && (q.x < points[i].x || q.y > points[i].y)
            })
        })
        .collect();
    idx.sort_by(|&a, &b| points[a].x.total_cmp(&points[b].x));
    idx
}

/// Writes a scatter plot with its Pareto front (smaller x and larger y are better).
pub fn pareto(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    points: &[Point],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (x0, x1) = range(points.iter().map(|p| p.x), 0.08);
    let (y0, y1) = range(points.iter().map(|p| p.y), 0.08);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(&e))?;
    let front = pareto_front(points);
    chart
        .draw_series(LineSeries::new(
            front.iter().map(|&i| (points[i].x, points[i].y)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("Pareto front")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(points.iter().map(|p| {
            EmptyElement::at((p.x, p.y))
                + Circle::new((0, 0), 4, RED.filled())
                + Text::new(p.label.clone(), (6, -12), ("sans-serif", 13))
        }))
        .map_err(|e| err(&e))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes line series (e.g. training and validation loss against steps).
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let all = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    if all.clone().next().is_none() {
        return Err(anyhow!("plotting {}: no finite points", path.display()));
    }
    let (x0, x1) = range(all.clone().map(|p| p.0), 0.02);
    let (y0, y1) = range(all.map(|p| p.1).filter(|v| v.is_finite()), 0.05);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(&e))?;
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied().filter(|p| p.1.is_finite()),
                c.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_keeps_undominated_points() {
        let p = |x, y| Point {
            label: String::new(),
            x,
            y,
        };
        let pts = [p(1.0, 0.5), p(2.0, 0.9), p(3.0, 0.8), p(4.0, 0.95)];
        assert_eq!(pareto_front(&pts), vec![0, 1, 3]);
    }
}
