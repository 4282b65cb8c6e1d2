//! accuracy_latency.svg, for readers of summary.md: every finished run as
//! a point, accuracy against batch-1 latency, in report.html's encoding
//! (colour is the calibration method, a triangle is residual fusion, a
//! filled marker is QAT), with the Pareto front (no other run is both
//! faster and more accurate), fp32's lines, and a label on every point
//! that overlaps no other label or marker ([`place_labels`]).

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{RunResult, RunRow};

/// Okabe-Ito colours, which people with any common colour blindness can
/// tell apart; report.js uses the same.
const METHOD_COLOURS: [(&str, RGBColor); 4] = [
    ("max", RGBColor(0x00, 0x72, 0xb2)),
    ("mse", RGBColor(0xe6, 0x9f, 0x00)),
    ("entropy", RGBColor(0x00, 0x9e, 0x73)),
    ("percentile", RGBColor(0xcc, 0x79, 0xa7)),
];
const OTHER_METHOD: RGBColor = RGBColor(0x56, 0xb4, 0xe9);

/// A calibration method's colour in every chart.
pub fn method_colour(method: &str) -> RGBColor {
    METHOD_COLOURS.iter().find(|(m, _)| *m == method).map_or(OTHER_METHOD, |(_, c)| *c)
}
const FRONT: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// Labels are 12 px sans-serif; this is a generous average glyph width
/// (Chromium draws run ids at about 5 px a glyph), so an estimated box is
/// never narrower than the drawn text. Text is anchored on the box's edge
/// nearest its point, so the spare width falls on the far side.
const GLYPH_WIDTH: f64 = 6.5;
const LABEL_HEIGHT: f64 = 14.0;
const MARKER_RADIUS: f64 = 6.0;
/// Past this many runs, only the Pareto front and fp32 are labelled.
const MOST_LABELS: usize = 60;

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

/// The runs a plot can place: finished, with a latency and a quality.
fn plottable(runs: &[RunResult]) -> impl Iterator<Item = &RunRow> {
    runs.iter().map(|r| &r.row).filter(|r| r.status == "ok" && r.latency_p50_ms.is_some() && r.quality().is_some())
}

/// Where both plots (this SVG and report.html's) start their zoom:
/// [`relevant_from`] over the runs they place.
pub fn zoom_floor(runs: &[RunResult], budget: Option<f64>) -> Option<f64> {
    relevant_from(plottable(runs).filter_map(RunRow::quality), budget)
}

/// The lowest accuracy the plots zoom to: `window` points below the best
/// run (or fp32, if better). Runs further down would squeeze every good
/// run onto one line, so both plots draw them at the bottom edge.
pub fn relevant_from(qualities: impl IntoIterator<Item = f64>, budget: Option<f64>) -> Option<f64> {
    let best = qualities.into_iter().fold(f64::NEG_INFINITY, f64::max);
    let window = (4.0 * budget.unwrap_or(0.0)).max(2.0);
    best.is_finite().then_some(best - window)
}

/// A box in pixels, `x` rightwards and `y` downwards from the top left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

impl Bounds {
    fn overlaps(&self, other: &Bounds) -> bool {
        self.x < other.x + other.width
            && other.x < self.x + self.width
            && self.y < other.y + other.height
            && other.y < self.y + self.height
    }

    fn inside(&self, area: &Bounds) -> bool {
        self.x >= area.x
            && self.y >= area.y
            && self.x + self.width <= area.x + area.width
            && self.y + self.height <= area.y + area.height
    }

    /// Distance from a point to the nearest point of the box.
    pub fn distance_to(&self, (px, py): (f64, f64)) -> f64 {
        let dx = (self.x - px).max(0.0).max(px - (self.x + self.width));
        let dy = (self.y - py).max(0.0).max(py - (self.y + self.height));
        dx.hypot(dy)
    }

    /// The point of the box nearest to `(px, py)`, where a leader line
    /// from the point meets it.
    pub fn nearest(&self, (px, py): (f64, f64)) -> (f64, f64) {
        (px.clamp(self.x, self.x + self.width), py.clamp(self.y, self.y + self.height))
    }
}

/// A label further than this from its point gets a leader line to it.
pub const LEADER_FROM: f64 = 10.0;

/// Where each point's label goes, in pixels: a box of `sizes[i]` near
/// `points[i]` that overlaps no other label, no marker (a square of
/// `marker_radius` around each of `markers`, which include the labelled
/// points and may hold more) and stays in `area`. Tried in rings of
/// growing distance in eight directions, then anywhere in the area,
/// nearest first; `None` where the area has no room left, which the
/// caller lists beside the plot instead. Crowded points are placed first,
/// while room near them remains.
pub fn place_labels(
    points: &[(f64, f64)],
    sizes: &[(f64, f64)],
    area: Bounds,
    markers: &[(f64, f64)],
    marker_radius: f64,
) -> Vec<Option<Bounds>> {
    let mut taken = Occupancy::default();
    for &(x, y) in markers {
        let side = 2.0 * marker_radius;
        taken.insert(Bounds { x: x - marker_radius, y: y - marker_radius, width: side, height: side });
    }
    let crowding = |i: usize| {
        let (x, y) = points[i];
        points.iter().filter(|&&(ox, oy)| (ox - x).abs() < 120.0 && (oy - y).abs() < 40.0).count()
    };
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(crowding(i)));

    let mut placed: Vec<Option<Bounds>> = vec![None; points.len()];
    for i in order {
        let (px, py) = points[i];
        let (width, height) = sizes[i];
        let free = |candidate: &Bounds, taken: &Occupancy| candidate.inside(&area) && !taken.overlaps(candidate);
        // Right, left, then the diagonals and straight up and down.
        let directions =
            [(1.0, 0.0), (-1.0, 0.0), (1.0, -1.0), (1.0, 1.0), (-1.0, -1.0), (-1.0, 1.0), (0.0, -1.0), (0.0, 1.0)];
        let rings = [marker_radius + 2.0, 16.0, 28.0, 44.0, 64.0, 90.0, 120.0];
        let anchored = |gap: f64, (dx, dy): (f64, f64)| {
            // The box's edge facing the point sits `gap` away from it.
            let x = match dx {
                d if d > 0.0 => px + gap * d,
                d if d < 0.0 => px + gap * d - width,
                _ => px - width / 2.0,
            };
            let y = match dy {
                d if d > 0.0 => py + gap * 0.6,
                d if d < 0.0 => py - gap * 0.6 - height,
                _ => py - height / 2.0,
            };
            Bounds { x, y, width, height }
        };
        let mut choice = rings
            .iter()
            .flat_map(|&gap| directions.iter().map(move |&d| (gap, d)))
            .map(|(gap, d)| anchored(gap, d))
            .find(|candidate| free(candidate, &taken));
        if choice.is_none() {
            let step = 6.0;
            let mut candidates = Vec::new();
            let mut y = area.y;
            while y + height <= area.y + area.height {
                let mut x = area.x;
                while x + width <= area.x + area.width {
                    candidates.push(Bounds { x, y, width, height });
                    x += step;
                }
                y += step;
            }
            candidates.sort_by(|a, b| a.distance_to((px, py)).total_cmp(&b.distance_to((px, py))));
            choice = candidates.into_iter().find(|candidate| free(candidate, &taken));
        }
        if let Some(bounds) = choice {
            taken.insert(bounds);
            placed[i] = Some(bounds);
        }
    }
    placed
}

/// Boxes already on the plot, bucketed by a coarse grid, so that a
/// candidate is checked against its neighbours only, not every marker of
/// a 10,000-run sweep.
#[derive(Default)]
struct Occupancy {
    cells: std::collections::HashMap<(i64, i64), Vec<Bounds>>,
}

impl Occupancy {
    const CELL: f64 = 32.0;

    fn cells_of(bounds: &Bounds) -> impl Iterator<Item = (i64, i64)> {
        let cell = |v: f64| (v / Self::CELL).floor() as i64;
        let (x0, x1) = (cell(bounds.x), cell(bounds.x + bounds.width));
        let (y0, y1) = (cell(bounds.y), cell(bounds.y + bounds.height));
        (x0..=x1).flat_map(move |x| (y0..=y1).map(move |y| (x, y)))
    }

    fn insert(&mut self, bounds: Bounds) {
        for cell in Self::cells_of(&bounds) {
            self.cells.entry(cell).or_default().push(bounds);
        }
    }

    fn overlaps(&self, candidate: &Bounds) -> bool {
        Self::cells_of(candidate)
            .any(|cell| self.cells.get(&cell).is_some_and(|boxes| boxes.iter().any(|b| b.overlaps(candidate))))
    }
}

/// One finished run as the plot draws it.
struct Point<'a> {
    run: &'a str,
    latency: f64,
    quality: f64,
    colour: RGBColor,
    fused: bool,
    qat: bool,
    baseline: bool,
}

pub fn accuracy_latency_svg(sweep: &str, runs: &[RunResult], budget: Option<f64>) -> String {
    let points: Vec<Point> = plottable(runs)
        .filter_map(|row| {
            let colour = method_colour(&row.calibration);
            Some(Point {
                run: &row.run,
                latency: row.latency_p50_ms?,
                quality: row.quality()?,
                colour: if row.calibration.is_empty() { BLACK } else { colour },
                fused: row.residual_fusion == "true",
                qat: row.qat_epochs.parse::<u32>().is_ok_and(|e| e > 0),
                baseline: row.calibration.is_empty(),
            })
        })
        .collect();
    if points.is_empty() {
        return no_plot(sweep);
    }
    let (_, measure) = super::quality_measure(runs);
    let fp32 = points.iter().find(|p| p.baseline);
    let floor = zoom_floor(runs, budget).unwrap_or(0.0);
    let relevant: Vec<&Point> = points.iter().filter(|p| p.quality >= floor).collect();
    let (x_range, y_range) = ranges(relevant.iter().map(|p| (p.latency, p.quality)));
    let outside = points.len() - relevant.len();

    let (width, height) = (960u32, 640u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let (chart_area, legend_area) = root.split_vertically(height - 56);
        let chart = ChartBuilder::on(&chart_area)
            .caption(format!("{sweep}: accuracy against latency"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range.clone(), y_range.clone());
        let Ok(mut chart) = chart else { return no_plot(sweep) };
        let _ = chart
            .configure_mesh()
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(0xe4, 0xe8, 0xec))
            .x_desc("latency p50 (ms, smallest batch), lower is better")
            .y_desc(measure)
            .draw();
        let clamp =
            |p: &Point| (p.latency.clamp(x_range.start, x_range.end), p.quality.clamp(y_range.start, y_range.end));
        let dashed = |from: (f64, f64), to: (f64, f64)| {
            DashedPathElement::new([from, to], 5, 4, ShapeStyle::from(&BLACK).stroke_width(1))
        };
        if let Some(base) = fp32 {
            let _ =
                chart.draw_series(std::iter::once(dashed((x_range.start, base.quality), (x_range.end, base.quality))));
            let _ =
                chart.draw_series(std::iter::once(dashed((base.latency, y_range.start), (base.latency, y_range.end))));
        }
        let coordinates: Vec<(f64, f64)> = points.iter().map(|p| (p.latency, p.quality)).collect();
        let front: Vec<(f64, f64)> = pareto_front(&coordinates).into_iter().map(|i| clamp(&points[i])).collect();
        let _ = chart.draw_series(LineSeries::new(front, ShapeStyle::from(&FRONT.mix(0.7)).stroke_width(2)));

        let pixel = |p: &Point| {
            let (x, y) = chart.backend_coord(&clamp(p));
            (f64::from(x), f64::from(y))
        };
        let pixels: Vec<(f64, f64)> = points.iter().map(pixel).collect();
        let labels: Vec<String> = points
            .iter()
            .map(|p| if p.quality < floor { format!("{} ({:.2}%)", p.run, p.quality) } else { p.run.to_string() })
            .collect();
        let sizes: Vec<(f64, f64)> =
            labels.iter().map(|l| (GLYPH_WIDTH * l.chars().count() as f64, LABEL_HEIGHT)).collect();
        let ((left, top), (right, bottom)) = {
            let (xs, ys) = chart.plotting_area().get_pixel_range();
            ((f64::from(xs.start), f64::from(ys.start)), (f64::from(xs.end), f64::from(ys.end)))
        };
        let area = Bounds { x: left + 2.0, y: top + 2.0, width: right - left - 4.0, height: bottom - top - 4.0 };
        let labelled: Vec<usize> = if points.len() <= MOST_LABELS {
            (0..points.len()).collect()
        } else {
            // A large sweep's plot has no room for every name: the runs
            // worth naming are the front's and fp32.
            let mut chosen = pareto_front(&coordinates);
            chosen.extend(points.iter().position(|p| p.baseline));
            chosen
        };
        let placed = place_labels(
            &labelled.iter().map(|&i| pixels[i]).collect::<Vec<_>>(),
            &labelled.iter().map(|&i| sizes[i]).collect::<Vec<_>>(),
            area,
            &pixels,
            MARKER_RADIUS,
        );
        let mut placements = vec![None; points.len()];
        for (&index, bounds) in labelled.iter().zip(placed) {
            placements[index] = bounds;
        }

        let font = ("sans-serif", 12).into_font().color(&BLACK);
        let mut unplaced = Vec::new();
        for (index, point) in points.iter().enumerate() {
            let (x, y) = pixels[index];
            match placements[index] {
                Some(bounds) => {
                    if bounds.distance_to((x, y)) > LEADER_FROM {
                        let (nx, ny) = bounds.nearest((x, y));
                        let _ = root.draw(&PathElement::new(
                            [(x as i32, y as i32), (nx as i32, ny as i32)],
                            ShapeStyle::from(&RGBColor(0x99, 0x99, 0x99)).stroke_width(1),
                        ));
                    }
                    let (anchor, at) = if bounds.x + bounds.width <= x {
                        (HPos::Right, bounds.x + bounds.width)
                    } else {
                        (HPos::Left, bounds.x)
                    };
                    let style = font.clone().pos(Pos::new(anchor, VPos::Top));
                    let _ = root.draw(&Text::new(labels[index].clone(), (at as i32, bounds.y as i32), style));
                }
                None if labelled.contains(&index) => unplaced.push(labels[index].clone()),
                None => {}
            }
            draw_marker(&root, point, (x as i32, y as i32), point.quality < floor);
        }

        let mut notes = Vec::new();
        if outside > 0 {
            let best = points.iter().map(|p| p.quality).fold(f64::NEG_INFINITY, f64::max);
            notes.push(format!(
                "{outside} run(s) more than {:.1} points below the best are drawn at the bottom edge, faded, with their figure",
                best - floor
            ));
        }
        if labelled.len() < points.len() {
            notes.push(format!(
                "{} runs: only the Pareto front and fp32 are named here; report.html names every point",
                points.len()
            ));
        }
        if !unplaced.is_empty() {
            notes.push(format!("no room to label: {}", unplaced.join(", ")));
        }
        legend(&legend_area, &notes);
        let _ = root.present();
    }
    svg
}

fn no_plot(sweep: &str) -> String {
    format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"40\"><text x=\"8\" y=\"24\">{sweep}: no plottable runs</text></svg>\n")
}

/// A run's marker: the method's colour; a triangle with residual fusion, a
/// circle without, a square for fp32; filled for QAT, hollow for PTQ;
/// faded where the run lies below the zoom and is drawn at the edge.
fn draw_marker<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Point,
    (x, y): (i32, i32),
    faded: bool,
) {
    let colour = if faded { p.colour.mix(0.5) } else { p.colour.mix(1.0) };
    let fill = if p.qat { colour.filled() } else { WHITE.filled() };
    let stroke = ShapeStyle::from(&colour).stroke_width(2);
    let r = MARKER_RADIUS as i32 - 1;
    if p.baseline {
        let _ = root.draw(&Rectangle::new([(x - r, y - r), (x + r, y + r)], fill));
        let _ = root.draw(&Rectangle::new([(x - r, y - r), (x + r, y + r)], stroke));
    } else if p.fused {
        let corners = vec![(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)];
        let _ = root.draw(&Polygon::new(corners.clone(), fill));
        let mut closed = corners.clone();
        closed.push(corners[0]);
        let _ = root.draw(&PathElement::new(closed, stroke));
    } else {
        let _ = root.draw(&Circle::new((x, y), r, fill));
        let _ = root.draw(&Circle::new((x, y), r, stroke));
    }
}

/// The key under the plot: methods by colour, then shape, fill and lines;
/// then any notes.
fn legend<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, notes: &[String]) {
    let style = ("sans-serif", 12).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    let grey = RGBColor(0x55, 0x55, 0x55);
    let mut x = 70;
    let y = 14;
    let mut item = |marker: Point, text: &str| {
        draw_marker(area, &marker, (x, y), false);
        let _ = area.draw(&Text::new(text.to_string(), (x + 10, y), style.clone()));
        x += 30 + (GLYPH_WIDTH as i32) * text.len() as i32;
    };
    let sample =
        |colour, fused, qat, baseline| Point { run: "", latency: 0.0, quality: 0.0, colour, fused, qat, baseline };
    for (method, colour) in METHOD_COLOURS {
        item(sample(colour, false, true, false), method);
    }
    item(sample(BLACK, false, false, true), "fp32");
    item(sample(grey, false, false, false), "circle: unfused");
    item(sample(grey, true, false, false), "triangle: fused");
    item(sample(grey, false, false, false), "hollow: PTQ");
    item(sample(grey, false, true, false), "filled: QAT");
    let _ = area.draw(&PathElement::new([(x, y), (x + 18, y)], ShapeStyle::from(&FRONT).stroke_width(2)));
    let _ = area.draw(&Text::new("Pareto front".to_string(), (x + 24, y), style.clone()));
    for (line, note) in notes.iter().enumerate() {
        let _ = area.draw(&Text::new(note.clone(), (70, y + 18 * (line as i32 + 1)), style.clone()));
    }
}

/// Axis ranges with some air around the points.
fn ranges(points: impl Iterator<Item = (f64, f64)>) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return (0.0..1.0, 0.0..100.0);
    }
    let x_pad = ((x1 - x0) * 0.12).max(x1 * 0.05).max(1e-3);
    let y_pad = ((y1 - y0) * 0.12).max(0.1);
    ((x0 - x_pad).max(0.0)..x1 + x_pad, (y0 - y_pad).max(0.0)..(y1 + y_pad).min(100.0))
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

    /// Labels never overlap each other or any marker, stay in the plot,
    /// and each sits next to its point or has a leader line to it; checked
    /// on a crowd where dozens of runs share nearly one spot, as runs of
    /// one recipe do, and on a spread.
    #[test]
    fn labels_overlap_nothing_and_stay_with_their_points() {
        let area = Bounds { x: 60.0, y: 20.0, width: 860.0, height: 520.0 };
        let mut seed = 7u64;
        let mut random = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let crowd: Vec<(f64, f64)> = (0..40).map(|_| (400.0 + 30.0 * random(), 200.0 + 20.0 * random())).collect();
        let spread: Vec<(f64, f64)> = (0..25).map(|_| (70.0 + 840.0 * random(), 30.0 + 500.0 * random())).collect();
        let edge: Vec<(f64, f64)> = (0..6).map(|k| (100.0 + 150.0 * k as f64, 536.0)).collect();
        // (points, share of labels beside their point, farthest any label may go)
        for (case, points, beside, farthest) in
            [("crowd", crowd, 0.0, 200.0), ("spread", spread, 0.8, 60.0), ("edge", edge, 0.0, 60.0)]
        {
            let sizes: Vec<(f64, f64)> =
                (0..points.len()).map(|k| (GLYPH_WIDTH * (18 + k % 12) as f64, LABEL_HEIGHT)).collect();
            let placed = place_labels(&points, &sizes, area, &points, MARKER_RADIUS);
            let boxes: Vec<Bounds> = placed.iter().map(|b| b.expect("room for every label")).collect();
            for (i, a) in boxes.iter().enumerate() {
                assert!(a.inside(&area), "label {i} leaves the plot: {a:?}");
                assert_eq!((a.width, a.height), sizes[i], "label {i} has its own size");
                for (j, b) in boxes.iter().enumerate().skip(i + 1) {
                    assert!(!a.overlaps(b), "labels {i} and {j} overlap: {a:?} {b:?}");
                }
                for (j, &(x, y)) in points.iter().enumerate() {
                    let marker = Bounds { x: x - MARKER_RADIUS, y: y - MARKER_RADIUS, width: 12.0, height: 12.0 };
                    assert!(!a.overlaps(&marker), "label {i} covers marker {j}");
                }
                let distance = a.distance_to(points[i]);
                assert!(distance <= farthest, "{case}: label {i} is {distance:.0} px from its point");
            }
            let near = boxes.iter().zip(&points).filter(|(b, p)| b.distance_to(**p) <= LEADER_FROM).count();
            assert!(
                near as f64 >= beside * points.len() as f64,
                "{near} of {} labels beside their points",
                points.len()
            );
        }
    }

    #[test]
    fn a_lone_point_is_labelled_to_its_right() {
        let area = Bounds { x: 0.0, y: 0.0, width: 500.0, height: 300.0 };
        let placed = place_labels(&[(100.0, 100.0)], &[(70.0, 14.0)], area, &[(100.0, 100.0)], MARKER_RADIUS);
        let label = placed[0].unwrap();
        assert_eq!((label.x, label.y), (108.0, 93.0));
    }

    /// A large sweep labels a few runs among thousands of markers, which
    /// the labels still keep clear of.
    #[test]
    fn labels_keep_clear_of_unlabelled_markers() {
        let area = Bounds { x: 0.0, y: 0.0, width: 500.0, height: 300.0 };
        let markers: Vec<(f64, f64)> =
            (0..2000).map(|k| (100.0 + (k % 50) as f64 * 3.0, 100.0 + (k / 50) as f64)).collect();
        let placed = place_labels(&[markers[0]], &[(70.0, 14.0)], area, &markers, MARKER_RADIUS);
        let label = placed[0].expect("room above or below the block");
        for &(x, y) in &markers {
            let marker = Bounds { x: x - MARKER_RADIUS, y: y - MARKER_RADIUS, width: 12.0, height: 12.0 };
            assert!(!label.overlaps(&marker), "{label:?} covers the marker at ({x}, {y})");
        }
    }

    #[test]
    fn a_full_plot_leaves_labels_unplaced_rather_than_overlapping() {
        let area = Bounds { x: 0.0, y: 0.0, width: 100.0, height: 30.0 };
        let points = [(20.0, 15.0), (80.0, 15.0), (50.0, 15.0)];
        let placed = place_labels(&points, &[(90.0, 14.0); 3], area, &points, 4.0);
        let boxes: Vec<Bounds> = placed.iter().flatten().copied().collect();
        assert!(boxes.len() < 3, "three 90 px labels cannot share a 100x30 plot with their markers");
        for (i, a) in boxes.iter().enumerate() {
            for b in &boxes[i + 1..] {
                assert!(!a.overlaps(b));
            }
        }
    }

    #[test]
    fn the_zoom_starts_a_few_points_below_the_best() {
        assert_eq!(relevant_from([91.6, 75.0, 91.2], None), Some(89.6));
        assert_eq!(relevant_from([91.6, 75.0], Some(1.0)), Some(87.6));
        assert_eq!(relevant_from([], None), None);
    }
}
