//! Spec errors that point at the exact spot in the user's file.
//!
//! serde stops at the first problem, but a user fixing a spec wants every
//! problem at once. So a spec is checked in layers: JSON syntax (one error,
//! nothing else can be checked), then the JSON Schema (every structural
//! error), then the meaning (every semantic error). Each error is mapped back
//! to a line and column through a span-keeping parse of the same text.

use std::fmt;
use std::path::{Path, PathBuf};

use jsonc_parser::ast;
use jsonc_parser::common::Ranged;

/// One step into a JSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A location such as `$.matrix.calibration[1]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonPath(pub Vec<Segment>);

impl JsonPath {
    pub fn root() -> Self {
        Self::default()
    }

    pub fn key(&self, key: &str) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.to_string()));
        next
    }

    pub fn index(&self, index: usize) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }

    /// Parses the dotted form used in code, e.g. `"matrix.calibration"`.
    pub fn parse(dotted: &str) -> Self {
        Self(dotted.split('.').filter(|s| !s.is_empty()).map(|s| Segment::Key(s.to_string())).collect())
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("$")?;
        for segment in &self.0 {
            match segment {
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// One problem in a spec, with everything needed to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub path: JsonPath,
    /// 1-based; 0 when the location is not in the file (e.g. a missing field).
    pub line: usize,
    pub column: usize,
    pub problem: String,
    pub expected: Option<String>,
    pub fix: String,
}

impl Diagnostic {
    pub fn new(path: JsonPath, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { path, line: 0, column: 0, problem: problem.into(), expected: None, fix: fix.into() }
    }

    pub fn expected(mut self, expected: impl Into<String>) -> Self {
        self.expected = Some(expected.into());
        self
    }

    pub fn at(mut self, line: usize, column: usize) -> Self {
        self.line = line;
        self.column = column;
        self
    }
}

/// Every problem found in one spec file.
#[derive(Debug, Clone)]
pub struct SpecErrors {
    pub file: PathBuf,
    pub diagnostics: Vec<Diagnostic>,
}

impl SpecErrors {
    pub fn single(file: &Path, diagnostic: Diagnostic) -> Self {
        Self { file: file.to_path_buf(), diagnostics: vec![diagnostic] }
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.diagnostics.len();
        writeln!(f, "{} has {count} error{}:", self.file.display(), if count == 1 { "" } else { "s" })?;
        for d in &self.diagnostics {
            if d.line > 0 {
                write!(f, "\n{}:{}:{}: ", self.file.display(), d.line, d.column)?;
            } else {
                write!(f, "\n{}: ", self.file.display())?;
            }
            writeln!(f, "{}: {}", d.path, d.problem)?;
            if let Some(expected) = &d.expected {
                writeln!(f, "  expected: {expected}")?;
            }
            writeln!(f, "  fix: {}", d.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Finds where JSON paths sit in the original text.
pub struct SourceMap<'a> {
    text: &'a str,
    root: Option<ast::Value<'a>>,
}

impl<'a> SourceMap<'a> {
    /// A map over text that already parsed as JSON; if the span parser still
    /// disagrees, locations fall back to "unknown" rather than failing.
    pub fn new(text: &'a str) -> Self {
        let root = jsonc_parser::parse_to_ast(text, &Default::default(), &Default::default())
            .ok()
            .and_then(|parsed| parsed.value);
        Self { text, root }
    }

    /// Line and column (1-based) of the value at `path`, or of the deepest
    /// ancestor that exists (a missing field is reported at its parent).
    pub fn locate(&self, path: &JsonPath) -> (usize, usize) {
        let Some(mut node) = self.root.as_ref() else {
            return (0, 0);
        };
        let mut offset = node.range().start;
        for segment in &path.0 {
            let child = match (segment, node) {
                (Segment::Key(key), ast::Value::Object(object)) => {
                    object.properties.iter().find(|p| p.name.as_str() == key).map(|p| {
                        // Point at the key for objects/arrays, which span lines,
                        // and at the value for scalars, which is what is wrong.
                        (&p.value, p.range.start)
                    })
                }
                (Segment::Index(index), ast::Value::Array(array)) => {
                    array.elements.get(*index).map(|e| (e, e.range().start))
                }
                _ => None,
            };
            match child {
                Some((value, key_start)) => {
                    node = value;
                    offset = match value {
                        ast::Value::Object(_) | ast::Value::Array(_) => key_start,
                        _ => value.range().start,
                    };
                }
                None => break,
            }
        }
        line_column(self.text, offset)
    }

    /// Where the *key* of an object member starts; used for unknown fields.
    pub fn locate_key(&self, parent: &JsonPath, key: &str) -> (usize, usize) {
        let Some(mut node) = self.root.as_ref() else {
            return (0, 0);
        };
        for segment in &parent.0 {
            let child = match (segment, node) {
                (Segment::Key(k), ast::Value::Object(object)) => {
                    object.properties.iter().find(|p| p.name.as_str() == k).map(|p| &p.value)
                }
                (Segment::Index(i), ast::Value::Array(array)) => array.elements.get(*i),
                _ => None,
            };
            match child {
                Some(value) => node = value,
                None => return self.locate(parent),
            }
        }
        if let ast::Value::Object(object) = node {
            if let Some(prop) = object.properties.iter().find(|p| p.name.as_str() == key) {
                return line_column(self.text, prop.range.start);
            }
        }
        self.locate(parent)
    }
}

/// A key given twice in one object: JSON parsers keep the last silently,
/// so a user who edits the first would see no effect.
#[derive(Debug, PartialEq)]
pub struct DuplicateKey {
    /// The second occurrence.
    pub path: JsonPath,
    pub first: (usize, usize),
    pub again: (usize, usize),
}

impl SourceMap<'_> {
    /// Every key that appears twice in the same object, anywhere.
    pub fn duplicate_keys(&self) -> Vec<DuplicateKey> {
        let mut found = Vec::new();
        if let Some(root) = &self.root {
            self.collect_duplicates(root, &JsonPath::root(), &mut found);
        }
        found
    }

    fn collect_duplicates(&self, node: &ast::Value<'_>, path: &JsonPath, found: &mut Vec<DuplicateKey>) {
        match node {
            ast::Value::Object(object) => {
                let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
                for property in &object.properties {
                    let name = property.name.as_str();
                    let child = path.key(name);
                    if let Some(&first) = seen.get(name) {
                        found.push(DuplicateKey {
                            path: child.clone(),
                            first: line_column(self.text, first),
                            again: line_column(self.text, property.range.start),
                        });
                    } else {
                        seen.insert(name, property.range.start);
                    }
                    self.collect_duplicates(&property.value, &child, found);
                }
            }
            ast::Value::Array(array) => {
                for (i, element) in array.elements.iter().enumerate() {
                    self.collect_duplicates(element, &path.index(i), found);
                }
            }
            _ => {}
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The closest candidate to a misspelt name, if it is close enough to be a
/// plausible typo.
pub fn did_you_mean<'c>(given: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(given, c), c))
        .filter(|(distance, c)| *distance <= (c.len() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_values_and_keys() {
        let text = "{\n  \"matrix\": {\n    \"calibration\": [\"max\", \"mse2\"]\n  },\n  \"bogus\": 1\n}";
        let map = SourceMap::new(text);
        let path = JsonPath::parse("matrix.calibration").index(1);
        assert_eq!(map.locate(&path), (3, 28));
        assert_eq!(map.locate_key(&JsonPath::root(), "bogus"), (5, 3));
        // A missing member is reported where its parent is.
        assert_eq!(map.locate(&JsonPath::parse("matrix.qat_epochs")), (2, 3));
    }

    #[test]
    fn finds_keys_given_twice_at_any_depth() {
        let text = "{\n  \"name\": \"a\",\n  \"matrix\": [{ \"x\": 1, \"x\": 2 }],\n  \"name\": \"b\"\n}";
        let found = SourceMap::new(text).duplicate_keys();
        let paths: Vec<String> = found.iter().map(|d| d.path.to_string()).collect();
        assert_eq!(paths, ["$.matrix[0].x", "$.name"]);
        assert_eq!((found[1].first, found[1].again), ((2, 3), (4, 3)));
    }

    #[test]
    fn suggests_only_plausible_typos() {
        assert_eq!(did_you_mean("calibraton", ["calibration", "matrix"]), Some("calibration"));
        assert_eq!(did_you_mean("zzz", ["calibration", "matrix"]), None);
    }
}
