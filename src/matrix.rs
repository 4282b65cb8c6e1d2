//! Expands a spec's axes into runs, with GitHub Actions' include/exclude
//! semantics, and names each run with a stable, readable id.
//!
//! The semantics, for users who know GitHub's matrix:
//! - the cartesian product of the axes given in `matrix` comes first;
//! - `exclude` then drops every combination that matches all the keys an
//!   entry names (so `{"residual_fusion": true}` drops every fused run);
//! - `include` then adds each entry's values to every combination it does not
//!   contradict on an axis the matrix named. An entry that fits no
//!   combination becomes a run of its own, with defaults for the axes it
//!   leaves out. Axes the matrix left out (and so defaulted) may be set by an
//!   include entry without creating a new run.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::spec::{Baseline, CalibrationMethod, FloatLayers, MatrixEntry, SweepSpec};

/// The quantization recipe of one run: one value of each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Recipe {
    pub calibration: CalibrationMethod,
    pub residual_fusion: bool,
    pub qat_epochs: u32,
    /// Absent from plans written before the axis existed: none in float.
    #[serde(default)]
    pub float_layers: FloatLayers,
}

/// What a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    Baseline(Baseline),
    Quantized(Recipe),
}

/// Which part of the spec asked for a run, so errors about it can point there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Baseline(usize),
    Matrix,
    Include(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Stable and readable, e.g. `mse-fused-qat2`; the same recipe always
    /// gets the same id, so results of reruns line up.
    pub id: String,
    pub kind: RunKind,
    pub origin: Origin,
}

impl Run {
    pub fn baseline(baseline: Baseline, index: usize) -> Self {
        Self { id: baseline.name().to_string(), kind: RunKind::Baseline(baseline), origin: Origin::Baseline(index) }
    }

    pub fn quantized(recipe: Recipe, origin: Origin) -> Self {
        Self { id: recipe.run_id(), kind: RunKind::Quantized(recipe), origin }
    }

    pub fn recipe(&self) -> Option<&Recipe> {
        match &self.kind {
            RunKind::Quantized(recipe) => Some(recipe),
            RunKind::Baseline(_) => None,
        }
    }
}

impl Recipe {
    pub fn run_id(&self) -> String {
        let fusion = if self.residual_fusion { "fused" } else { "unfused" };
        let training = if self.qat_epochs == 0 { "ptq".to_string() } else { format!("qat{}", self.qat_epochs) };
        let mut id = format!("{}-{fusion}-{training}", self.calibration.name());
        if !self.float_layers.is_none() {
            id = format!("{id}-{}", self.float_layers.name());
        }
        id
    }
}

/// An include entry that would create a run but names no calibration method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncompleteInclude {
    pub index: usize,
}

/// A combination under construction: `None` marks an axis still unset.
#[derive(Clone, Copy, Default)]
struct Combination {
    calibration: Option<CalibrationMethod>,
    residual_fusion: Option<bool>,
    qat_epochs: Option<u32>,
    float_layers: Option<FloatLayers>,
    origin: Option<Origin>,
}

/// Which axes the matrix names: an include entry may not overwrite their
/// values, only those of the axes left to their defaults.
#[derive(Clone, Copy)]
struct Named {
    fusion: bool,
    qat: bool,
    float_layers: bool,
}

/// Every run a spec asks for, baselines first, in a stable order.
pub fn expand(spec: &SweepSpec) -> Result<Vec<Run>, Vec<IncompleteInclude>> {
    let matrix = &spec.matrix;
    let named = Named {
        fusion: !matrix.residual_fusion.is_empty(),
        qat: !matrix.qat_epochs.is_empty(),
        float_layers: !matrix.float_layers.is_empty(),
    };

    let mut product = Vec::new();
    for &calibration in &matrix.calibration {
        for residual_fusion in or_default(&matrix.residual_fusion, false) {
            for qat_epochs in or_default(&matrix.qat_epochs, 0) {
                for float_layers in or_default(&matrix.float_layers, FloatLayers::default()) {
                    product.push(Combination {
                        calibration: Some(calibration),
                        residual_fusion: named.fusion.then_some(residual_fusion),
                        qat_epochs: named.qat.then_some(qat_epochs),
                        float_layers: named.float_layers.then_some(float_layers),
                        origin: Some(Origin::Matrix),
                    });
                }
            }
        }
    }

    product.retain(|combo| !spec.exclude.iter().any(|entry| excludes(entry, combo)));

    let original_count = product.len();
    let mut incomplete = Vec::new();
    for (index, entry) in spec.include.iter().enumerate() {
        let mut fitted = false;
        for combo in &mut product[..original_count] {
            if fits(entry, combo, named) {
                combo.residual_fusion = entry.residual_fusion.or(combo.residual_fusion);
                combo.qat_epochs = entry.qat_epochs.or(combo.qat_epochs);
                combo.float_layers = entry.float_layers.or(combo.float_layers);
                fitted = true;
            }
        }
        if !fitted {
            if entry.calibration.is_none() {
                incomplete.push(IncompleteInclude { index });
                continue;
            }
            product.push(Combination {
                calibration: entry.calibration,
                residual_fusion: entry.residual_fusion,
                qat_epochs: entry.qat_epochs,
                float_layers: entry.float_layers,
                origin: Some(Origin::Include(index)),
            });
        }
    }
    if !incomplete.is_empty() {
        return Err(incomplete);
    }

    let mut runs: Vec<Run> = Vec::new();
    let mut seen = HashSet::new();
    let mut push_unique = |run: Run| {
        if seen.insert(run.id.clone()) {
            runs.push(run);
        }
    };
    for (index, &baseline) in spec.baselines.iter().enumerate() {
        push_unique(Run::baseline(baseline, index));
    }
    for combo in product {
        let recipe = Recipe {
            calibration: combo.calibration.expect("every combination names a calibration method"),
            residual_fusion: combo.residual_fusion.unwrap_or(false),
            qat_epochs: combo.qat_epochs.unwrap_or(0),
            float_layers: combo.float_layers.unwrap_or_default(),
        };
        push_unique(Run::quantized(recipe, combo.origin.unwrap_or(Origin::Matrix)));
    }
    Ok(runs)
}

fn or_default<T: Copy>(values: &[T], default: T) -> Vec<T> {
    if values.is_empty() {
        vec![default]
    } else {
        values.to_vec()
    }
}

/// Whether an exclude entry matches a combination. An entry naming an axis
/// the matrix left out matches against that axis' default.
fn excludes(entry: &MatrixEntry, combo: &Combination) -> bool {
    if entry == &MatrixEntry::default() {
        return false;
    }
    entry.calibration.is_none_or(|c| Some(c) == combo.calibration)
        && entry.residual_fusion.is_none_or(|f| f == combo.residual_fusion.unwrap_or(false))
        && entry.qat_epochs.is_none_or(|q| q == combo.qat_epochs.unwrap_or(0))
        && entry.float_layers.is_none_or(|f| f == combo.float_layers.unwrap_or_default())
}

/// Whether an include entry can extend a combination without overwriting a
/// value that came from an axis the matrix named.
fn fits(entry: &MatrixEntry, combo: &Combination, named: Named) -> bool {
    entry.calibration.is_none_or(|c| Some(c) == combo.calibration)
        && (!named.fusion || entry.residual_fusion.is_none_or(|f| Some(f) == combo.residual_fusion))
        && (!named.qat || entry.qat_epochs.is_none_or(|q| Some(q) == combo.qat_epochs))
        && (!named.float_layers || entry.float_layers.is_none_or(|f| Some(f) == combo.float_layers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> SweepSpec {
        serde_json::from_str(json).unwrap()
    }

    fn ids(runs: &[Run]) -> Vec<&str> {
        runs.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn product_of_axes_with_baseline_first() {
        let s = spec(
            r#"{"name":"s","model":"m.onnx","matrix":{"calibration":["max","mse"],"residual_fusion":[false,true]}}"#,
        );
        assert_eq!(
            ids(&expand(&s).unwrap()),
            ["fp32", "max-unfused-ptq", "max-fused-ptq", "mse-unfused-ptq", "mse-fused-ptq"]
        );
    }

    #[test]
    fn exclude_drops_partial_matches() {
        let s = spec(
            r#"{"name":"s","model":"m.onnx","baselines":[],
                "matrix":{"calibration":["max","mse"],"residual_fusion":[false,true],"qat_epochs":[0,2]},
                "exclude":[{"calibration":"max","qat_epochs":2},{"residual_fusion":true,"qat_epochs":0}]}"#,
        );
        assert_eq!(
            ids(&expand(&s).unwrap()),
            ["max-unfused-ptq", "mse-unfused-ptq", "mse-unfused-qat2", "mse-fused-qat2"]
        );
    }

    /// GitHub semantics: an include entry that contradicts a named axis makes
    /// a new run; one that only sets a defaulted axis extends matching runs.
    #[test]
    fn include_extends_or_adds() {
        let s = spec(
            r#"{"name":"s","model":"m.onnx","baselines":[],
                "matrix":{"calibration":["max","mse"],"qat_epochs":[0]},
                "include":[{"calibration":"mse","residual_fusion":true},{"calibration":"entropy","qat_epochs":2}]}"#,
        );
        assert_eq!(ids(&expand(&s).unwrap()), ["max-unfused-ptq", "mse-fused-ptq", "entropy-unfused-qat2"]);
    }

    #[test]
    fn include_without_method_that_fits_nothing_is_an_error() {
        let s = spec(r#"{"name":"s","model":"m.onnx","include":[{"qat_epochs":3}]}"#);
        assert_eq!(expand(&s).unwrap_err(), vec![IncompleteInclude { index: 0 }]);
    }

    #[test]
    fn float_layers_name_their_runs_and_compose_with_include() {
        let s = spec(
            r#"{"name":"s","model":"m.onnx","baselines":[],
                "matrix":{"calibration":["entropy"],"residual_fusion":[true],"float_layers":[0,2,"auto"]},
                "include":[{"calibration":"max","float_layers":1,"qat_epochs":2}]}"#,
        );
        assert_eq!(
            ids(&expand(&s).unwrap()),
            ["entropy-fused-ptq", "entropy-fused-ptq-float2", "entropy-fused-ptq-auto", "max-unfused-qat2-float1"]
        );
    }

    #[test]
    fn exclude_can_remove_everything() {
        let s = spec(
            r#"{"name":"s","model":"m.onnx","baselines":[],"matrix":{"calibration":["max"]},"exclude":[{"calibration":"max"}]}"#,
        );
        assert!(expand(&s).unwrap().is_empty());
    }
}
