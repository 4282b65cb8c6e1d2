//! The user's sweep spec: its typed shape, its JSON Schema, and the checks
//! that turn a file into a `SweepSpec` or into a list of located errors.
//!
//! This module checks what can be checked from the text alone. Checks that
//! need the model, the dataset or the stage registry live in `sweep`.

pub mod diagnostic;
pub mod model;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

pub use diagnostic::{Diagnostic, JsonPath, Segment, SpecErrors};
pub use model::*;

use diagnostic::{did_you_mean, SourceMap};

/// The JSON Schema of a spec, as published at experiments/schema.json.
pub fn json_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(SweepSpec)).expect("a derived schema serializes")
}

/// The schema as `qsweep schema` prints it and experiments/schema.json stores it.
pub fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&json_schema()).expect("a schema serializes");
    text.push('\n');
    text
}

/// A spec that passed every text-only check, with its source kept so later
/// checks can still point at lines.
pub struct ParsedSpec {
    pub file: PathBuf,
    pub text: String,
    pub spec: SweepSpec,
}

impl ParsedSpec {
    /// A diagnostic located at `path` in this spec's text.
    pub fn diagnostic(&self, path: JsonPath, problem: impl Into<String>, fix: impl Into<String>) -> Diagnostic {
        let (line, column) = SourceMap::new(&self.text).locate(&path);
        Diagnostic::new(path, problem, fix).at(line, column)
    }

    pub fn errors(&self, diagnostics: Vec<Diagnostic>) -> SpecErrors {
        SpecErrors { file: self.file.clone(), diagnostics }
    }

    /// The directory that relative paths in the spec are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        self.file.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// A key given twice is an error at the second, naming the first's line.
fn duplicate_key_diagnostics(text: &str) -> Vec<Diagnostic> {
    SourceMap::new(text)
        .duplicate_keys()
        .into_iter()
        .map(|duplicate| {
            let key = match duplicate.path.0.last() {
                Some(Segment::Key(key)) => key.clone(),
                _ => String::new(),
            };
            Diagnostic::new(
                duplicate.path,
                format!("`{key}` is given twice: first at line {}, again here", duplicate.first.0),
                "keep one of them; JSON readers silently use the last",
            )
            .at(duplicate.again.0, duplicate.again.1)
        })
        .collect()
}

/// Reads and checks a spec file.
pub fn read(file: &Path) -> Result<ParsedSpec, SpecErrors> {
    let text = crate::files::regular_file(file).and_then(|()| std::fs::read_to_string(file)).map_err(|e| {
        SpecErrors::single(
            file,
            Diagnostic::new(
                JsonPath::root(),
                format!("cannot read the spec file: {e}"),
                "check the path; specs usually live in experiments/*.json",
            ),
        )
    })?;
    parse(file, text)
}

/// Checks spec text: JSON syntax, then the schema, then the typed decode.
pub fn parse(file: &Path, text: String) -> Result<ParsedSpec, SpecErrors> {
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        let message = e.to_string();
        let message = message.rfind(" at line ").map_or(message.as_str(), |i| &message[..i]).to_string();
        SpecErrors::single(
            file,
            Diagnostic::new(
                JsonPath::root(),
                format!("malformed JSON: {message}"),
                "fix the JSON syntax at that spot; a missing comma, quote or bracket is the usual cause",
            )
            .at(e.line(), e.column()),
        )
    })?;

    let mut diagnostics = duplicate_key_diagnostics(&text);
    diagnostics.extend(schema_diagnostics(&text, &value));
    if !diagnostics.is_empty() {
        return Err(SpecErrors { file: file.to_path_buf(), diagnostics });
    }
    // The schema is derived from the same types, so this only fails if the
    // two disagree; report it rather than panic.
    let spec = serde_json::from_value::<SweepSpec>(value).map_err(|e| {
        SpecErrors::single(
            file,
            Diagnostic::new(
                JsonPath::root(),
                format!("spec does not decode: {e}"),
                "compare the spec with `qsweep schema`",
            ),
        )
    })?;
    Ok(ParsedSpec { file: file.to_path_buf(), text, spec })
}

fn validator() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| jsonschema::validator_for(&json_schema()).expect("the derived schema is valid"))
}

/// Every schema violation in `value`, each located in `text`.
fn schema_diagnostics(text: &str, value: &Value) -> Vec<Diagnostic> {
    use jsonschema::error::ValidationErrorKind as Kind;

    let map = SourceMap::new(text);
    let schema = json_schema();
    let mut out = Vec::new();
    for error in validator().iter_errors(value) {
        let path = JsonPath(
            error
                .instance_path()
                .iter()
                .map(|segment| match segment {
                    jsonschema::paths::LocationSegment::Property(key) => Segment::Key(key.to_string()),
                    jsonschema::paths::LocationSegment::Index(index) => Segment::Index(index),
                })
                .collect(),
        );
        let found = lookup(value, &path);
        match error.kind() {
            Kind::AdditionalProperties { unexpected } => {
                let allowed = field_names(&schema, &path);
                for key in unexpected {
                    let (line, column) = map.locate_key(&path, key);
                    let fix = match did_you_mean(key, allowed.iter().map(String::as_str)) {
                        Some(close) => format!("did you mean `{close}`? Rename or remove `{key}`"),
                        None => format!("remove `{key}`; `qsweep schema` lists every field"),
                    };
                    out.push(
                        Diagnostic::new(path.key(key), format!("unknown field `{key}`"), fix)
                            .expected(format!("one of the fields {}", quoted_list(&allowed)))
                            .at(line, column),
                    );
                }
                continue;
            }
            Kind::AnyOf { .. } | Kind::OneOfNotValid { .. } => {
                let (words, forms) = allowed_forms(&schema, &path);
                let given = found.and_then(Value::as_str).unwrap_or_default();
                let fix = match did_you_mean(given, words.iter().map(String::as_str)) {
                    Some(close) => format!("did you mean \"{close}\"?"),
                    None => "use one of the allowed forms; `qsweep schema` describes each".to_string(),
                };
                let mut allowed: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
                allowed.extend(forms);
                let (line, column) = map.locate(&path);
                out.push(
                    Diagnostic::new(path.clone(), format!("{} is none of the forms allowed here", show(found)), fix)
                        .expected(format!("one of {}", allowed.join(", ")))
                        .at(line, column),
                );
                continue;
            }
            Kind::Enum { options } => {
                let allowed: Vec<String> = options
                    .as_array()
                    .map(|values| values.iter().map(|v| v.as_str().map_or(v.to_string(), str::to_string)).collect())
                    .unwrap_or_default();
                let given = found.map(|v| v.as_str().map_or(v.to_string(), str::to_string)).unwrap_or_default();
                let fix = match did_you_mean(&given, allowed.iter().map(String::as_str)) {
                    Some(close) => format!("did you mean \"{close}\"?"),
                    None => "use one of the allowed values".to_string(),
                };
                let (line, column) = map.locate(&path);
                out.push(
                    Diagnostic::new(path.clone(), format!("{} is not an allowed value", show(found)), fix)
                        .expected(format!("one of {}", quoted_list(&allowed)))
                        .at(line, column),
                );
                continue;
            }
            _ => {}
        }
        let (problem, expected, fix) = match error.kind() {
            Kind::Type { kind } => {
                let kind = type_kind_name(kind);
                // The field's own example where its schema gives one.
                let example = schema_node(&schema, &path)
                    .get("examples")
                    .and_then(|examples| examples.get(0))
                    .map_or_else(|| example_of(&kind).to_string(), Value::to_string);
                (
                    format!("{} has the wrong type", show(found)),
                    kind.clone(),
                    format!("write it as {kind}, e.g. `{example}`"),
                )
            }
            Kind::Required { property } => {
                let name = property.as_str().unwrap_or_default().to_string();
                (format!("missing required field `{name}`"), format!("a `{name}` field here"), format!("add `{name}`"))
            }
            Kind::Minimum { limit } | Kind::ExclusiveMinimum { limit } => {
                (format!("{} is too small", show(found)), format!("at least {limit}"), "raise the value".to_string())
            }
            Kind::Maximum { limit } | Kind::ExclusiveMaximum { limit } => {
                (format!("{} is too large", show(found)), format!("at most {limit}"), "lower the value".to_string())
            }
            Kind::MinItems { limit } => (
                "the list is too short".to_string(),
                format!("at least {limit} item(s)"),
                "add values, or leave the field out to use its default".to_string(),
            ),
            Kind::UniqueItems => (
                "the list repeats a value".to_string(),
                "each value once".to_string(),
                "remove the duplicate".to_string(),
            ),
            Kind::Pattern { pattern } | Kind::Format { format: pattern } => (
                format!("{} has the wrong form", show(found)),
                format!("text matching {pattern}"),
                "use letters, digits, '.', '_' and '-' only, starting with a letter or digit".to_string(),
            ),
            Kind::MaxLength { limit } => (
                format!("{} is too long", show(found)),
                format!("at most {limit} characters"),
                "shorten it".to_string(),
            ),
            _ => (error.to_string(), String::new(), "compare the spec with `qsweep schema`".to_string()),
        };
        let (line, column) = map.locate(&path);
        let mut diagnostic = Diagnostic::new(path, problem, fix).at(line, column);
        if !expected.is_empty() {
            diagnostic = diagnostic.expected(expected);
        }
        out.push(diagnostic);
    }
    out.sort_by_key(|d| (d.line, d.column));
    out
}

fn lookup<'v>(value: &'v Value, path: &JsonPath) -> Option<&'v Value> {
    path.0.iter().try_fold(value, |node, segment| match segment {
        Segment::Key(key) => node.get(key),
        Segment::Index(index) => node.get(index),
    })
}

/// The schema node that describes the value at `path`: `$ref`s followed,
/// and at each step the alternative of an `anyOf` or `oneOf` that has
/// the field or items to step into.
fn schema_node(schema: &Value, path: &JsonPath) -> Value {
    let mut node = follow(schema, schema);
    for segment in &path.0 {
        let step = |candidate: &Value| -> Option<Value> {
            let next = match segment {
                Segment::Key(key) => candidate.get("properties")?.get(key)?,
                Segment::Index(_) => candidate.get("items")?,
            };
            Some(follow(schema, next))
        };
        node = step(&node).or_else(|| alternatives_of(schema, &node).iter().find_map(step)).unwrap_or(Value::Null);
    }
    node
}

/// `node` with its `$ref`s followed.
fn follow(schema: &Value, node: &Value) -> Value {
    let mut node = node.clone();
    while let Some(reference) = node.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or_default();
        node = schema["$defs"][name].clone();
    }
    node
}

/// The alternatives of an `anyOf` or `oneOf` node, nested ones flattened.
fn alternatives_of(schema: &Value, node: &Value) -> Vec<Value> {
    let listed = node.get("anyOf").or_else(|| node.get("oneOf")).and_then(Value::as_array);
    match listed {
        Some(alternatives) => alternatives
            .iter()
            .flat_map(|a| {
                let a = follow(schema, a);
                if a.get("anyOf").is_some() || a.get("oneOf").is_some() {
                    alternatives_of(schema, &a)
                } else {
                    vec![a]
                }
            })
            .collect(),
        None => Vec::new(),
    }
}

/// The field names the schema allows in the object at `path`.
fn field_names(schema: &Value, path: &JsonPath) -> Vec<String> {
    let node = schema_node(schema, path);
    // An optional object is "the object or null".
    let object = std::iter::once(node.clone())
        .chain(alternatives_of(schema, &node))
        .find(|n| n.get("properties").is_some())
        .unwrap_or_default();
    object
        .get("properties")
        .and_then(Value::as_object)
        .map(|properties| properties.keys().cloned().collect())
        .unwrap_or_default()
}

/// The forms an `anyOf` or `oneOf` at `path` allows, as a user would
/// write them: its words (`"auto"`), one-key objects (`{"pad": …}`), and
/// the types of the rest (a number).
fn allowed_forms(schema: &Value, path: &JsonPath) -> (Vec<String>, Vec<String>) {
    let (mut words, mut forms) = (Vec::new(), Vec::new());
    for alternative in alternatives_of(schema, &schema_node(schema, path)) {
        let listed = alternative.get("enum").and_then(Value::as_array).cloned().unwrap_or_default();
        let constant = alternative.get("const").cloned();
        let texts: Vec<String> =
            listed.iter().chain(constant.iter()).filter_map(|v| v.as_str().map(String::from)).collect();
        if !texts.is_empty() {
            words.extend(texts);
            continue;
        }
        match alternative.get("required").and_then(Value::as_array).map(Vec::as_slice) {
            Some([only]) if alternative.get("type") == Some(&Value::from("object")) => {
                forms.push(format!("{{\"{}\": …}}", only.as_str().unwrap_or_default()));
            }
            _ => {
                if let Some(kind) = alternative.get("type").and_then(Value::as_str) {
                    forms.push(match kind {
                        "number" | "integer" => {
                            let bound = |key: &str, words: &str| {
                                alternative.get(key).map(|limit| format!(" {words} {limit}")).unwrap_or_default()
                            };
                            let bounds: Vec<String> = [
                                bound("exclusiveMinimum", "above"),
                                bound("minimum", "at least"),
                                bound("exclusiveMaximum", "below"),
                                bound("maximum", "at most"),
                            ]
                            .into_iter()
                            .filter(|b| !b.is_empty())
                            .collect();
                            format!("a number{}", bounds.join(","))
                        }
                        "array" => "a list".to_string(),
                        other => format!("a {other}"),
                    });
                }
            }
        }
    }
    (words, forms)
}

fn quoted_list(items: &[String]) -> String {
    items.iter().map(|item| format!("\"{item}\"")).collect::<Vec<_>>().join(", ")
}

fn show(value: Option<&Value>) -> String {
    match value {
        Some(value) => {
            let text = value.to_string();
            if text.len() > 40 {
                format!("{}...", &text[..text.char_indices().nth(37).map_or(text.len(), |(i, _)| i)])
            } else {
                text
            }
        }
        None => "the value".to_string(),
    }
}

fn type_kind_name(kind: &jsonschema::error::TypeKind) -> String {
    use jsonschema::error::TypeKind;
    let name = |t: &jsonschema::JsonType| match t.to_string().as_str() {
        "integer" => "an integer".to_string(),
        "number" => "a number".to_string(),
        "string" => "a string".to_string(),
        "boolean" => "true or false".to_string(),
        "array" => "a list".to_string(),
        "object" => "an object".to_string(),
        other => other.to_string(),
    };
    match kind {
        TypeKind::Single(t) => name(t),
        TypeKind::Multiple(set) => set.iter().map(|t| name(&t)).collect::<Vec<_>>().join(" or "),
    }
}

fn example_of(kind: &str) -> &'static str {
    if kind.contains("list") {
        "[1, 64]"
    } else if kind.contains("integer") || kind.contains("number") {
        "500"
    } else if kind.contains("true") {
        "true"
    } else if kind.contains("object") {
        "{ ... }"
    } else {
        "\"text\""
    }
}
