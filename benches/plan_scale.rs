//! Target: planning a spec that expands to 10,000 runs takes under 1 s,
//! with peak RSS under 200 MB.
//!
//! Times what `qsweep plan` does after reading files: parse and check the
//! spec text, expand the matrix, and build the DAG with every content key.
//! Peak RSS is the process high-water mark (VmHWM), which includes the
//! benchmark's own start-up.
//!
//!     cargo bench --bench plan_scale

mod common;

use common::peak_rss_mb;

use std::path::Path;
use std::time::Instant;

use qsweep::plan::{Plan, Sources};
use qsweep::{matrix, spec};

fn main() {
    // 4 methods x 2 fusion settings x 1,250 QAT epoch counts = 10,000 runs.
    let epochs: Vec<String> = (0..1250).map(|e| e.to_string()).collect();
    let text = format!(
        r#"{{"name": "scale", "model": "m.onnx", "baselines": [],
            "matrix": {{"calibration": ["max", "mse", "entropy", "percentile"],
                        "residual_fusion": [false, true], "qat_epochs": [{}]}}}}"#,
        epochs.join(", ")
    );
    let sources = Sources::idx(&"0".repeat(64), &"0".repeat(64));

    let mut best = f64::MAX;
    let mut shape = (0, 0);
    for _ in 0..5 {
        let started = Instant::now();
        let parsed = spec::parse(Path::new("scale.json"), text.clone()).expect("a valid spec");
        let runs = matrix::expand(&parsed.spec).expect("runs");
        let plan = Plan::build(&parsed.spec, &runs, &sources);
        best = best.min(started.elapsed().as_secs_f64());
        shape = (plan.runs.len(), plan.tasks.len());
    }
    println!("plan a 10,000-run spec: {} runs, {} distinct tasks", shape.0, shape.1);
    println!("  time      {:>8.1} ms  (best of 5; target < 1000 ms)", best * 1e3);
    println!("  peak RSS  {:>8.1} MB  (target < 200 MB)", peak_rss_mb());
}
