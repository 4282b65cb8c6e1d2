//! accuracy_latency.svg: every finished run as a point, accuracy against
//! latency, with the Pareto front (no other run is both faster and more
//! accurate) drawn as a line, the view people use to pick a recipe.

use plotters::prelude::*;

use super::RunResult;

/// Points on the front, sorted by latency: each is faster than every more
/// accurate point.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| points[a].0.total_cmp(&points[b].0).then(points[b].1.total_cmp(&points[a].1)));
    let mut front = Vec::new();
    let mut best_accuracy = f64::NEG_INFINITY;
    for index in order {
        if points[index].1 > best_accuracy {
            best_accuracy = points[index].1;
            front.push(index);
        }
    }
    front
}

pub fn accuracy_latency_svg(sweep: &str, runs: &[RunResult]) -> String {
    let finished: Vec<(&str, f64, f64)> =
        runs.iter().filter_map(|r| Some((r.row.run.as_str(), r.row.latency_p50_ms?, r.row.quality()?))).collect();
    let measure = if runs.iter().any(|r| r.row.accuracy.is_some()) {
        "top-1 accuracy (%)"
    } else {
        "top-1 agreement with fp32 (%)"
    };
    let points: Vec<(f64, f64)> = finished.iter().map(|&(_, l, a)| (l, a)).collect();
    let front = pareto_front(&points);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 520)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let (x_range, y_range) = ranges(&points);
        let chart = ChartBuilder::on(&root)
            .caption(format!("{sweep}: accuracy against latency"), ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range, y_range);
        let Ok(mut chart) = chart else {
            return svg_fallback(sweep);
        };
        let _ = chart.configure_mesh().x_desc("latency p50 (ms, smallest batch)").y_desc(measure).draw();
        let front_line: Vec<(f64, f64)> = front.iter().map(|&i| points[i]).collect();
        let _ = chart
            .draw_series(LineSeries::new(front_line, ShapeStyle::from(&RED).stroke_width(2)))
            .map(|series| series.label("Pareto front").legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED)));
        let mut placed: Vec<(i32, i32, i32)> = Vec::new();
        for (index, &(name, latency, accuracy)) in finished.iter().enumerate() {
            let color = if front.contains(&index) { RED } else { BLUE };
            let (x, y) = chart.backend_coord(&(latency, accuracy));
            let offset = label_offset(&mut placed, x, y, name);
            let point = EmptyElement::at((latency, accuracy))
                + Circle::new((0, 0), 5, color.filled())
                + Text::new(name.to_string(), offset, ("sans-serif", 13).into_font().color(&BLACK));
            let _ = chart.draw_series(std::iter::once(point));
        }
        let _ = chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw();
        let _ = root.present();
    }
    svg
}

/// Where a point's label goes, relative to the point: beside it, stepped
/// down line by line until it overlaps no label already placed, so runs
/// with nearly equal results stay readable.
fn label_offset(placed: &mut Vec<(i32, i32, i32)>, x: i32, y: i32, name: &str) -> (i32, i32) {
    const LINE: i32 = 15;
    let width = 7 * name.len() as i32;
    let mut dy = -LINE;
    while placed.iter().any(|&(px, py, pw)| (y + dy - py).abs() < LINE && x + 8 < px + pw && px < x + 8 + width) {
        dy += LINE;
    }
    placed.push((x + 8, y + dy, width));
    (8, dy)
}

/// Axis ranges with some air around the points.
fn ranges(points: &[(f64, f64)]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    if points.is_empty() {
        return (0.0..1.0, 0.0..100.0);
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let x_pad = ((x1 - x0) * 0.25).max(x1 * 0.1).max(1e-3);
    let y_pad = ((y1 - y0) * 0.25).max(0.5);
    ((x0 - x_pad).max(0.0)..x1 + x_pad, (y0 - y_pad).max(0.0)..(y1 + y_pad).min(100.5))
}

fn svg_fallback(sweep: &str) -> String {
    format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"40\"><text x=\"8\" y=\"24\">{sweep}: no plottable runs</text></svg>\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_keeps_only_undominated_points() {
        // (latency, accuracy): b is dominated by a (slower and less accurate).
        let points = [(1.0, 90.0), (2.0, 89.0), (3.0, 92.0), (0.5, 80.0)];
        assert_eq!(pareto_front(&points), vec![3, 0, 2]);
    }
}
