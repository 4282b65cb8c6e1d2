//! Target: planning a spec that expands to 10,000 runs takes under 1 s,
//! with peak RSS under 200 MB.
//!
//! The schema caps `qat_epochs` at 1000, so the largest spec it admits has
//! 4 methods x 2 fusion settings x 1,001 epoch counts = 8,008 runs; that is
//! the spec timed. (Running in a valid spec matters: one the schema refuses
//! would time the refusal, or panic.)
//!
//! Times what `qsweep plan` does after reading files: parse and check the
//! spec text, expand the matrix, and build the DAG with every content key.
//! Peak RSS is the process high-water mark (VmHWM), which includes the
//! benchmark's own start-up.
//!
//!     cargo bench --bench plan_scale            (-- --smoke: 88 runs, once)

mod common;

use common::{peak_rss_mb, smoke};

use std::path::Path;
use std::time::Instant;

use qsweep::plan::{Plan, Sources};
use qsweep::{matrix, spec};

fn main() {
    let (epochs, repeats) = if smoke() { (11, 1) } else { (1001, 5) };
    let epoch_list: Vec<String> = (0..epochs).map(|e| e.to_string()).collect();
    let text = format!(
        r#"{{"name": "scale", "model": "m.onnx", "baselines": [],
            "matrix": {{"calibration": ["max", "mse", "entropy", "percentile"],
                        "residual_fusion": [false, true], "qat_epochs": [{}]}}}}"#,
        epoch_list.join(", ")
    );
    let sources = Sources::idx(&"0".repeat(64), &"0".repeat(64));

    let mut best = f64::MAX;
    let mut shape = (0, 0);
    for _ in 0..repeats {
        let started = Instant::now();
        let parsed = spec::parse(Path::new("scale.json"), text.clone())
            .unwrap_or_else(|e| panic!("the benchmark's spec no longer validates:\n{e}"));
        let runs = matrix::expand(&parsed.spec).expect("runs");
        let plan = Plan::build(&parsed.spec, &runs, &sources);
        best = best.min(started.elapsed().as_secs_f64());
        shape = (plan.runs.len(), plan.tasks.len());
    }
    assert_eq!(shape.0, 8 * epochs, "4 methods x 2 fusion settings x {epochs} epoch counts");
    println!("plan a {}-run spec: {} distinct tasks", shape.0, shape.1);
    println!("  time      {:>8.1} ms  (best of {repeats}; target < 1000 ms for 10,000 runs)", best * 1e3);
    println!("  peak RSS  {:>8.1} MB  (target < 200 MB)", peak_rss_mb());
}
