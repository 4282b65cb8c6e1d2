//! The reference sweep's report.html, as committed, in a real headless
//! Chromium from file://: it loads with no console error and no request
//! beyond itself, and its table, plot, details and comparison do what a
//! reader does with them. Expected figures come from the committed
//! runs.csv, not from the page.

// Only this test drives a browser; as its own module (not in `common`)
// the other test binaries do not build the WebDriver client.
#[path = "common/browser.rs"]
mod browser;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use browser::Browser;
use fantoccini::actions::{InputSource, MouseActions, PointerAction};
use fantoccini::Locator;

fn reference_report() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results/fashion-resnet/report.html")
}

/// The committed runs.csv as (header, rows of cells).
fn runs_csv() -> (Vec<String>, Vec<Vec<String>>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results/fashion-resnet/runs.csv");
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header = reader.headers().unwrap().iter().map(str::to_string).collect();
    let rows = reader.records().map(|r| r.unwrap().iter().map(str::to_string).collect()).collect();
    (header, rows)
}

fn column(header: &[String], name: &str) -> usize {
    header.iter().position(|h| h == name).unwrap_or_else(|| panic!("runs.csv has no {name} column"))
}

async fn table_runs(browser: &Browser) -> Vec<String> {
    let cells = browser.client.find_all(Locator::Css("#runs-table tbody td[data-column='run'] a")).await.unwrap();
    let mut ids = Vec::new();
    for cell in cells {
        ids.push(cell.text().await.unwrap());
    }
    ids
}

async fn text_of(browser: &Browser, css: &str) -> String {
    browser.client.find(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn the_report_loads_offline_with_no_error_and_no_request() {
    runtime().block_on(async {
        let browser = Browser::start(1400, 1000).await;
        let url = browser.open_report(&reference_report()).await;
        let console = browser.console().await;
        let problems: Vec<_> = console.iter().filter(|m| m["level"] == "SEVERE" || m["level"] == "WARNING").collect();
        assert!(problems.is_empty(), "console errors: {problems:?}");
        let requests = browser.requests().await;
        assert!(!requests.is_empty(), "the network log records at least the page itself");
        assert!(requests.iter().all(|r| *r == url), "requests beyond the page: {requests:?}");
        let resources = browser.script("return performance.getEntriesByType('resource').length").await;
        assert_eq!(resources, 0);

        // Every run of runs.csv is in the table, in its order.
        let (header, rows) = runs_csv();
        let ids: Vec<String> = rows.iter().map(|r| r[column(&header, "run")].clone()).collect();
        assert_eq!(table_runs(&browser).await, ids);
        let headings = browser.client.find_all(Locator::Css("#runs-table th[data-column]")).await.unwrap();
        assert_eq!(headings.len(), header.len(), "every runs.csv column is in the table");
        browser.close().await;
    });
}

#[test]
fn clicking_a_header_sorts_the_table() {
    runtime().block_on(async {
        let browser = Browser::start(1400, 1000).await;
        browser.open_report(&reference_report()).await;
        let (header, rows) = runs_csv();
        let (run, accuracy) = (column(&header, "run"), column(&header, "accuracy"));
        // Ascending, blanks last, ties in runs.csv order; then descending.
        let mut expected: Vec<(Option<f64>, usize)> =
            rows.iter().enumerate().map(|(i, r)| (r[accuracy].parse().ok(), i)).collect();
        expected.sort_by(|a, b| match (a.0, b.0) {
            (Some(x), Some(y)) => x.total_cmp(&y).then(a.1.cmp(&b.1)),
            (None, None) => a.1.cmp(&b.1),
            (None, _) => std::cmp::Ordering::Greater,
            (_, None) => std::cmp::Ordering::Less,
        });
        let ascending: Vec<String> = expected.iter().map(|&(_, i)| rows[i][run].clone()).collect();
        let heading = browser.client.find(Locator::Css("#runs-table th[data-column='accuracy']")).await.unwrap();
        heading.click().await.unwrap();
        assert_eq!(table_runs(&browser).await, ascending);
        assert_eq!(heading.attr("aria-sort").await.unwrap().as_deref(), Some("ascending"));

        heading.click().await.unwrap();
        let mut descending = expected.clone();
        descending.sort_by(|a, b| match (a.0, b.0) {
            (Some(x), Some(y)) => y.total_cmp(&x).then(a.1.cmp(&b.1)),
            (None, None) => a.1.cmp(&b.1),
            (None, _) => std::cmp::Ordering::Greater,
            (_, None) => std::cmp::Ordering::Less,
        });
        let descending: Vec<String> = descending.iter().map(|&(_, i)| rows[i][run].clone()).collect();
        assert_eq!(table_runs(&browser).await, descending);
        assert_ne!(descending, ascending, "the reference runs differ in accuracy");

        // A text column sorts by its text.
        browser.client.find(Locator::Css("#runs-table th[data-column='run']")).await.unwrap().click().await.unwrap();
        let mut by_name: Vec<String> = rows.iter().map(|r| r[run].clone()).collect();
        by_name.sort();
        assert_eq!(table_runs(&browser).await, by_name);
        browser.close().await;
    });
}

#[test]
fn a_filter_hides_the_rows_that_do_not_match() {
    runtime().block_on(async {
        let browser = Browser::start(1400, 1000).await;
        browser.open_report(&reference_report()).await;
        let (header, rows) = runs_csv();
        let run = column(&header, "run");
        let expected: Vec<String> = rows
            .iter()
            .filter(|r| {
                let text = r.join(" ").to_lowercase();
                text.contains("entropy") && text.contains("auto")
            })
            .map(|r| r[run].clone())
            .collect();
        assert!(!expected.is_empty() && expected.len() < rows.len());
        let filter = browser.client.find(Locator::Css("#filter")).await.unwrap();
        filter.send_keys("entropy auto").await.unwrap();
        assert_eq!(table_runs(&browser).await, expected);
        let shown = browser.client.find(Locator::Css("#shown")).await.unwrap().text().await.unwrap();
        assert_eq!(shown, format!("{} of {} runs", expected.len(), rows.len()));
        // The plot fades what the filter hides.
        let faded = browser.client.find_all(Locator::Css("#plot .point.filtered-out")).await.unwrap().len();
        let drawn = browser.client.find_all(Locator::Css("#plot .point")).await.unwrap().len();
        assert_eq!(drawn - faded, expected.len());

        browser.client.find(Locator::Css("#clear-filters")).await.unwrap().click().await.unwrap();
        assert_eq!(table_runs(&browser).await.len(), rows.len());
        browser.close().await;
    });
}

#[test]
fn hovering_a_point_shows_that_runs_figures() {
    runtime().block_on(async {
        let browser = Browser::start(1400, 1000).await;
        browser.open_report(&reference_report()).await;
        let (header, rows) = runs_csv();
        let cell = |row: &Vec<String>, name: &str| row[column(&header, name)].clone();
        for id in ["mse-fused-ptq", "fp32"] {
            let row = rows.iter().find(|r| cell(r, "run") == id).unwrap();
            let point = browser.client.find(Locator::Css(&format!("#plot .point[data-run='{id}']"))).await.unwrap();
            let hover = MouseActions::new("mouse".into()).then(PointerAction::MoveToElement {
                element: point,
                duration: Some(Duration::from_millis(50)),
                x: 0.0,
                y: 0.0,
            });
            browser.client.perform_actions(hover).await.unwrap();
            let tooltip = browser.client.find(Locator::Css("#tooltip")).await.unwrap();
            assert!(tooltip.is_displayed().await.unwrap(), "{id}: no tooltip");
            let text = tooltip.text().await.unwrap();
            let accuracy: f64 = cell(row, "accuracy").parse().unwrap();
            let latency: f64 = cell(row, "latency_p50_ms").parse().unwrap();
            let throughput: f64 = cell(row, "throughput").parse().unwrap();
            for expected in [
                id.to_string(),
                format!("{accuracy:.2}%"),
                format!("{latency:.3} ms"),
                format!("{throughput:.0} images/s"),
            ] {
                assert!(text.contains(&expected), "{id}: the tooltip lacks {expected:?}: {text}");
            }
        }
        browser.close().await;
    });
}

#[test]
fn the_comparison_shows_two_runs_side_by_side() {
    runtime().block_on(async {
        let browser = Browser::start(1400, 1000).await;
        browser.open_report(&reference_report()).await;
        let (header, rows) = runs_csv();
        let cell = |id: &str, name: &str| rows.iter().find(|r| r[0] == id).unwrap()[column(&header, name)].clone();
        let (a, b) = ("max-unfused-ptq", "entropy-fused-ptq-auto");
        browser.client.find(Locator::Css("#compare-a")).await.unwrap().select_by_value(a).await.unwrap();
        browser.client.find(Locator::Css("#compare-b")).await.unwrap().select_by_value(b).await.unwrap();
        let side = |s: &str| format!("#compare-table th[data-side='{s}']");
        assert_eq!(
            (text_of(&browser, &side("a")).await, text_of(&browser, &side("b")).await),
            (a.to_string(), b.to_string())
        );
        let accuracy_row =
            browser.client.find(Locator::Css("#compare-table tr[data-column='accuracy']")).await.unwrap();
        let cells = accuracy_row.find_all(Locator::Css("td")).await.unwrap();
        let (va, vb): (f64, f64) = (cell(a, "accuracy").parse().unwrap(), cell(b, "accuracy").parse().unwrap());
        assert_eq!(cells[0].text().await.unwrap(), format!("{va:.2}"));
        assert_eq!(cells[1].text().await.unwrap(), format!("{vb:.2}"));
        let float_ops = browser.client.find(Locator::Css("#compare-table tr[data-column='float_ops']")).await.unwrap();
        assert_eq!(
            float_ops.attr("class").await.unwrap().as_deref(),
            Some("differs"),
            "auto left ops in float, max none"
        );

        // Ticking two runs in the table compares those two.
        for id in ["mse-unfused-ptq", "percentile-fused-ptq"] {
            let tick = Locator::Css(&format!("#runs-table tr[data-run='{id}'] input.compare-tick"));
            browser.client.find(tick).await.unwrap().click().await.unwrap();
        }
        assert_eq!(
            (text_of(&browser, &side("a")).await, text_of(&browser, &side("b")).await),
            ("mse-unfused-ptq".to_string(), "percentile-fused-ptq".to_string())
        );
        browser.close().await;
    });
}

/// The plot in pixels: every calibration method's colour is there, and
/// the plot area holds far more than a blank frame's few colours.
#[test]
fn the_plot_is_drawn_in_every_methods_colour() {
    runtime().block_on(async {
        let browser = Browser::start(1400, 1000).await;
        browser.open_report(&reference_report()).await;
        let plot = browser.client.find(Locator::Css("#plot svg")).await.unwrap();
        let png = plot.screenshot().await.unwrap();
        let image = image::load_from_memory(&png).unwrap().to_rgb8();
        assert!(image.width() > 600 && image.height() > 300, "{}x{}", image.width(), image.height());
        let mut counts: HashMap<[u8; 3], usize> = HashMap::new();
        for pixel in image.pixels() {
            *counts.entry(pixel.0).or_default() += 1;
        }
        let near = |colour: [u8; 3]| {
            counts
                .iter()
                .filter(|(c, _)| c.iter().zip(colour).all(|(&a, b)| a.abs_diff(b) <= 12))
                .map(|(_, n)| n)
                .sum::<usize>()
        };
        let methods = [
            ("max", [0x00, 0x72, 0xb2]),
            ("mse", [0xe6, 0x9f, 0x00]),
            ("entropy", [0x00, 0x9e, 0x73]),
            ("percentile", [0xcc, 0x79, 0xa7]),
        ];
        for (method, colour) in methods {
            assert!(near(colour) >= 15, "{method}'s colour covers {} pixels", near(colour));
        }
        let distinct = counts.values().filter(|&&n| n >= 5).count();
        assert!(distinct >= 12, "only {distinct} colours in the plot");
        browser.close().await;
    });
}

/// The default view zooms to the runs that matter and draws the others at
/// the edge; "All runs" draws them in place; the throughput toggle
/// changes the axis.
#[test]
fn the_plot_zooms_to_the_runs_that_matter_and_toggles_its_axis() {
    runtime().block_on(async {
        let browser = Browser::start(1400, 1000).await;
        browser.open_report(&reference_report()).await;
        let (header, rows) = runs_csv();
        let accuracies: Vec<f64> = rows.iter().filter_map(|r| r[column(&header, "accuracy")].parse().ok()).collect();
        let best = accuracies.iter().copied().fold(f64::MIN, f64::max);
        // The reference spec's budget is 0.3 points: the zoom starts 2 below the best.
        let below = accuracies.iter().filter(|&&a| a < best - 2.0).count();
        assert!(below > 0, "entropy PTQ lies far below the other runs");
        let outside = browser.client.find_all(Locator::Css("#plot .point.outside")).await.unwrap().len();
        assert!(outside >= below, "{outside} points at the edge, {below} runs below the zoom");

        browser.client.find(Locator::Css("button[data-value='all']")).await.unwrap().click().await.unwrap();
        let outside = browser.client.find_all(Locator::Css("#plot .point.outside")).await.unwrap().len();
        assert_eq!(outside, 0);

        let labels = "return [...document.querySelectorAll('#plot .axis-label')].map(t => t.textContent).join(' | ')";
        let label = browser.script(labels).await;
        assert!(label.as_str().unwrap().contains("latency p50 at batch 1 (ms), lower is better"), "{label}");
        browser.client.find(Locator::Css("button[data-value='throughput']")).await.unwrap().click().await.unwrap();
        let label = browser.script(labels).await;
        assert!(label.as_str().unwrap().contains("throughput at batch 64 (images/s), higher is better"), "{label}");
        browser.close().await;
    });
}

#[test]
fn a_runs_details_show_its_stages_sensitivity_health_and_machine() {
    runtime().block_on(async {
        let browser = Browser::start(1400, 1000).await;
        browser.open_report(&reference_report()).await;
        let id = "entropy-fused-ptq-auto";
        let link = Locator::Css("#runs-table tr[data-run='entropy-fused-ptq-auto'] td[data-column='run'] a");
        browser.client.find(link).await.unwrap().click().await.unwrap();
        let title = browser.client.find(Locator::Css("#detail h3")).await.unwrap().text().await.unwrap();
        assert!(title.starts_with(id), "{title}");
        let stages = browser.client.find_all(Locator::Css("#stages-table tbody tr td:first-child")).await.unwrap();
        let mut names = Vec::new();
        for stage in stages {
            names.push(stage.text().await.unwrap());
        }
        for stage in ["prepare-data", "calibrate", "sensitivity", "fallback", "build", "evaluate"] {
            assert!(names.iter().any(|n| n == stage), "no {stage} in {names:?}");
        }
        let bars = browser.client.find_all(Locator::Css("#detail svg.sensitivity rect.bar")).await.unwrap().len();
        assert!(bars > 0, "the sensitivity chart has bars");
        let search_rows = browser.client.find_all(Locator::Css("#search-table tbody tr")).await.unwrap().len();
        assert!(search_rows >= 2, "the search went past step 0");
        let findings = browser.client.find_all(Locator::Css("#detail ul.findings li")).await.unwrap().len();
        assert!(findings > 0, "calibration health names the input's outliers");
        let machine = browser.client.find(Locator::Css("#environment-table")).await.unwrap().text().await.unwrap();
        assert!(machine.contains("ONNX Runtime 1.31"), "{machine}");
        let coverage = browser.client.find(Locator::Css("#coverage-table")).await.unwrap().text().await.unwrap();
        assert!(coverage.contains("Q/DQ pairs in the model"), "{coverage}");
        browser.close().await;
    });
}

/// A QAT run's details draw its validation curve: a point per epoch and
/// one for the PTQ start, the kept epoch ringed, and the same figures as a
/// table, matching the committed summary.md's QAT table for the run.
#[test]
fn a_qat_runs_details_draw_its_validation_curve() {
    let summary = std::fs::read_to_string(reference_report().with_file_name("summary.md")).unwrap();
    let id = "entropy-fused-qat2";
    let qat_section = &summary[summary.find("\n## QAT\n").expect("a QAT section")..];
    let row = qat_section.lines().find(|l| l.starts_with(&format!("| {id} |"))).expect("a QAT table row");
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    // | run | learning rate | validation top-1 by epoch | kept | test | twin |
    let curve: Vec<String> = cells[3].split(" → ").map(|v| v.trim_matches('*').to_string()).collect();
    let kept: usize = cells[4].parse().unwrap();
    runtime().block_on(async {
        let browser = Browser::start(1400, 1000).await;
        browser.open_report(&reference_report()).await;
        let link = Locator::Css("#runs-table tr[data-run='entropy-fused-qat2'] td[data-column='run'] a");
        browser.client.find(link).await.unwrap().click().await.unwrap();
        let points = browser.client.find_all(Locator::Css("#detail svg.qat-curve circle")).await.unwrap().len();
        assert_eq!(points, curve.len(), "a point per epoch and the start");
        let ringed =
            browser.client.find_all(Locator::Css("#detail svg.qat-curve circle.qat-kept")).await.unwrap().len();
        assert_eq!(ringed, 1);
        let rows = browser.client.find_all(Locator::Css("#qat-table tbody tr")).await.unwrap();
        assert_eq!(rows.len(), curve.len());
        for (epoch, (row, top1)) in rows.into_iter().zip(&curve).enumerate() {
            let text = row.text().await.unwrap();
            assert!(text.starts_with(&epoch.to_string()), "{text}");
            assert!(text.contains(&format!("{top1}%")), "{text} lacks {top1}%");
            assert_eq!(text.contains("(kept)"), epoch == kept, "{text}");
        }
        let note = text_of(&browser, "#detail .qat-note").await;
        assert!(note.contains("augmentation: none") && note.contains("range test"), "{note}");
        browser.close().await;
    });
}
