//! The README's examples are checked against what qsweep prints and what
//! the committed results hold, so the docs cannot drift from the code.

mod common;

use std::path::Path;

use common::*;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The text between `start` (exclusive) and the next line "```".
fn block_after<'a>(text: &'a str, start: &str) -> &'a str {
    let at = text.find(start).unwrap_or_else(|| panic!("README has no {start:?}")) + start.len();
    let rest = &text[at..];
    &rest[..rest.find("\n```").expect("the block is closed") + 1]
}

/// The sample error is exactly what `qsweep validate` prints for the
/// sample spec, so the field list cannot fall behind the schema.
#[test]
fn the_readme_sample_error_is_what_validate_prints() {
    let text = readme();
    let example = block_after(&text, "```text\n$ cat bad.json\n");
    let (spec, printed) = example.split_once("$ qsweep validate bad.json\n").expect("the example runs validate");
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "bad.json", spec);
    std::os::unix::fs::symlink(reference_model().parent().unwrap(), dir.path().join("models")).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_qsweep"))
        .args(["validate", "bad.json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(stderr(&output), printed, "README.md's sample error differs from what validate prints");
}

/// The example output's table is the committed reference results', row
/// by row, and its run and task counts are the reference spec's plan.
#[test]
fn the_readme_example_output_is_the_committed_reference_sweep() {
    let text = readme();
    let example = block_after(&text, "```text\n$ cargo run --release -- run experiments/fashion-resnet.json\n");
    let table: Vec<Vec<&str>> = example
        .lines()
        .skip_while(|l| !l.starts_with("run "))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    let committed = csv_rows(&Path::new(env!("CARGO_MANIFEST_DIR")).join("results/fashion-resnet"));
    assert_eq!(table.len(), committed.len(), "README rows: {table:?}");
    for (shown, row) in table.iter().zip(&committed) {
        // run, top-1, delta, p50 ms, img/s, status as `print_table` rounds them.
        let number = |field: usize| row[field].parse::<f64>().unwrap();
        let delta = if &row[0] == "fp32" { "-".to_string() } else { format!("{:.2}", number(6)) };
        let expected = [
            row[0].to_string(),
            format!("{:.2}", number(5)),
            delta,
            format!("{:.3}", number(10)),
            format!("{:.0}", number(12)),
            row[4].to_string(),
        ];
        assert_eq!(shown, &expected, "README.md's row differs from results/fashion-resnet/runs.csv");
    }

    let output = qsweep(&["plan", reference_spec().to_str().unwrap(), "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let (runs, tasks) = (plan["runs"].as_array().unwrap().len(), plan["tasks"].as_array().unwrap().len());
    assert!(example.contains(&format!("runs: {runs} done, 0 failed, 0 remaining")), "{runs} runs:\n{example}");
    assert!(example.contains(&format!("{tasks} task(s) executed")), "{tasks} tasks:\n{example}");
    assert_eq!(runs, committed.len());
}

/// ARCHITECTURE.md's module table is in dependency order: each module's
/// `crate::` imports (tests and comments aside) name only modules listed
/// above it, except `plan` reading each stage's `VERSION`.
#[test]
fn the_module_table_lists_each_module_below_what_it_uses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let order: Vec<String> = architecture
        .lines()
        .skip_while(|l| !l.starts_with("| module |"))
        .skip(2)
        .take_while(|l| l.starts_with("| `"))
        .map(|l| l.split('`').nth(1).unwrap().to_string())
        .filter(|m| m != "main.rs")
        .collect();
    let source_files = |module: &str| -> Vec<std::path::PathBuf> {
        let mut files = vec![root.join(format!("src/{module}.rs"))];
        let mut dirs = vec![root.join(format!("src/{module}"))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        files.into_iter().filter(|f| f.exists()).collect()
    };
    let mut problems = Vec::new();
    for (at, module) in order.iter().enumerate() {
        let files = source_files(module);
        assert!(!files.is_empty(), "ARCHITECTURE.md lists `{module}`, which src/ does not have");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            let code: String =
                code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
            for used in code.split("crate::").skip(1) {
                for name in used_modules(used).into_iter().filter(|n| *n != module) {
                    let below = order.iter().position(|m| m == name).is_none_or(|p| p > at);
                    if below && !(module == "plan" && name == "stages") {
                        problems.push(format!("{} uses {name}", file.strip_prefix(root).unwrap().display()));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "modules that use one listed below them (or not listed):\n{}", problems.join("\n"));
}

/// The modules named right after a `crate::`: one path, or each
/// top-level entry of a `{...}` group (which may span lines and nest).
fn used_modules(after: &str) -> Vec<&str> {
    let Some(group) = after.strip_prefix('{') else {
        return vec![after.split(|c: char| !c.is_alphanumeric() && c != '_').next().unwrap()];
    };
    let (mut depth, mut start, mut names) = (0, 0, Vec::new());
    for (at, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                names.push(&group[start..at]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                names.push(&group[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    names
        .into_iter()
        .map(|n| n.trim().split("::").next().unwrap_or_default().trim())
        .filter(|n| !n.is_empty())
        .collect()
}
