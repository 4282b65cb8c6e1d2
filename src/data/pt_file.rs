//! Reading what `torch.save` writes, without PyTorch and without running
//! any of the pickle's code.
//!
//! Every PyTorch since 1.6 writes a zip archive: `<name>/data.pkl`, a
//! pickle of the saved object in which each tensor's storage is a
//! persistent id naming a raw little-endian record `<name>/data/<key>`.
//! candle's pickle reader turns `data.pkl` into a tree of objects without
//! executing anything; this module walks that tree the way
//! `torch.load(weights_only=True)` does, accepting only the globals that
//! rebuild tensors and dicts, and refusing any other global by name. Tensor
//! bytes are not read here: a tensor is a reference to its record, which
//! `data::tensor_source` streams.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};

use super::tensor_source::Dtype;

/// A value of the saved object, with tensors as references to their bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum PtValue {
    Tensor(PtTensor),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    None,
    /// A list or a tuple.
    Sequence(Vec<PtValue>),
    Dict(Vec<(String, PtValue)>),
}

impl PtValue {
    /// What the value is, in Python's terms, for messages.
    pub fn kind(&self) -> String {
        match self {
            PtValue::Tensor(t) => format!("a {} tensor of shape {:?}", t.dtype.name(), t.shape),
            PtValue::Int(_) => "an int".into(),
            PtValue::Float(_) => "a float".into(),
            PtValue::Bool(_) => "a bool".into(),
            PtValue::Str(_) => "a str".into(),
            PtValue::None => "None".into(),
            PtValue::Sequence(items) => format!("a list of {}", items.len()),
            PtValue::Dict(entries) => format!("a dict of {}", entries.len()),
        }
    }
}

/// A contiguous tensor: `shape` elements of `dtype` starting `offset`
/// elements into the zip entry `entry` of `file`.
#[derive(Debug, Clone, PartialEq)]
pub struct PtTensor {
    pub file: PathBuf,
    pub entry: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub offset: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PtError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(
        "{0} is in PyTorch's legacy format (not a zip archive), which qsweep does not read\n  fix: re-save it with PyTorch 1.6 or later: `torch.save(torch.load(path), path)` (without _use_new_zipfile_serialization=False)"
    )]
    Legacy(PathBuf),
    #[error("{0} is not a torch.save file: {1}")]
    NotTorch(PathBuf, String),
    #[error(
        "{path} uses the global `{global}`, which torch.load(weights_only=True) would refuse too; qsweep never runs code from a .pt file\n  fix: save only tensors, in a tensor, dict, list or tuple (e.g. convert NumPy arrays with torch.from_numpy)"
    )]
    ForbiddenGlobal { path: PathBuf, global: String },
    #[error("{path}: {what}\n  fix: {fix}")]
    Unsupported { path: PathBuf, what: String, fix: String },
}

/// Reads the object tree of a `torch.save` file.
pub fn load(path: &Path) -> Result<PtValue, PtError> {
    let io = |e| PtError::Io(path.to_path_buf(), e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 4];
    let read = file.read(&mut magic).map_err(io)?;
    if &magic[..read] != b"PK\x03\x04" {
        // Legacy files start with a pickle (protocol 2: 0x80 0x02) or a tar.
        return Err(if read >= 2 && magic[0] == 0x80 {
            PtError::Legacy(path.to_path_buf())
        } else {
            PtError::NotTorch(path.to_path_buf(), "it is not a zip archive".into())
        });
    }
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(std::fs::File::open(path).map_err(io)?))
        .map_err(|e| PtError::NotTorch(path.to_path_buf(), e.to_string()))?;
    let pickle_name = archive
        .file_names()
        .filter_map(Result::ok)
        .find(|name| name.ends_with("/data.pkl") || name == "data.pkl")
        .map(|name| name.into_owned())
        .ok_or_else(|| PtError::NotTorch(path.to_path_buf(), "the archive holds no data.pkl".into()))?;
    let records = pickle_name.strip_suffix("data.pkl").expect("found by its suffix").to_string() + "data/";
    let object = {
        let entry = archive.by_name(&pickle_name).map_err(|e| PtError::NotTorch(path.to_path_buf(), e.to_string()))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut std::io::BufReader::new(entry))
            .and_then(|()| stack.finalize())
            .map_err(|e| PtError::NotTorch(path.to_path_buf(), format!("its data.pkl does not parse: {e}")))?
    };
    Walk { path, records: &records }.value(object)
}

/// Turns candle's objects into values, refusing what is not data.
struct Walk<'a> {
    path: &'a Path,
    records: &'a str,
}

impl Walk<'_> {
    fn value(&self, object: Object) -> Result<PtValue, PtError> {
        Ok(match object {
            Object::Int(v) => PtValue::Int(v.into()),
            Object::Long(v) => PtValue::Int(v),
            Object::Float(v) => PtValue::Float(v),
            Object::Bool(v) => PtValue::Bool(v),
            Object::Unicode(v) => PtValue::Str(v),
            Object::None => PtValue::None,
            Object::Tuple(items) | Object::List(items) => {
                PtValue::Sequence(items.into_iter().map(|item| self.value(item)).collect::<Result<_, _>>()?)
            }
            Object::Dict(entries) => PtValue::Dict(
                entries
                    .into_iter()
                    .map(|(key, value)| match key {
                        Object::Unicode(key) => Ok((key, self.value(value)?)),
                        Object::Int(key) => Ok((key.to_string(), self.value(value)?)),
                        other => Err(self.unsupported(format!("a dict key {other:?}"), "use str keys")),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Object::Reduce { callable, args } => self.reduce(*callable, *args)?,
            Object::Class { module_name, class_name } => return Err(self.forbidden(&module_name, &class_name)),
            // An object with state: name the class that would be built.
            Object::Build { callable, .. } => match *callable {
                Object::Reduce { callable, .. } | Object::Build { callable, .. } => {
                    return Err(self.class_of(*callable))
                }
                other => return Err(self.class_of(other)),
            },
            Object::PersistentLoad(_) | Object::Mark => {
                return Err(self.unsupported("a bare storage".into(), "save tensors, not storages"))
            }
        })
    }

    /// A call: only tensor rebuilding is data.
    fn reduce(&self, callable: Object, args: Object) -> Result<PtValue, PtError> {
        let Object::Class { module_name, class_name } = callable else {
            return Err(self.unsupported("a call of a computed object".into(), "save only tensors"));
        };
        match (module_name.as_str(), class_name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2") => self.tensor(args),
            // nn.Parameter(tensor, requires_grad, hooks)
            ("torch._utils", "_rebuild_parameter") => match args {
                Object::Tuple(mut items) if !items.is_empty() => self.value(items.swap_remove(0)),
                _ => Err(self.unsupported("a malformed nn.Parameter".into(), "save parameter.detach()")),
            },
            _ => Err(self.forbidden(&module_name, &class_name)),
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`,
    /// the storage being `("storage", torch.<Type>Storage, key, location, numel)`.
    fn tensor(&self, args: Object) -> Result<PtValue, PtError> {
        let malformed = || self.unsupported("a malformed tensor record".into(), "re-save the file with torch.save");
        let Object::Tuple(args) = args else { return Err(malformed()) };
        let [storage, offset, size, stride, ..] = args.as_slice() else { return Err(malformed()) };
        let Object::PersistentLoad(storage) = storage else { return Err(malformed()) };
        let Object::Tuple(storage) = storage.as_ref() else { return Err(malformed()) };
        let [_, Object::Class { module_name, class_name }, Object::Unicode(key), ..] = storage.as_slice() else {
            return Err(malformed());
        };
        if module_name != "torch" {
            return Err(self.forbidden(module_name, class_name));
        }
        let dtype = Dtype::of_storage(class_name).ok_or_else(|| {
            self.unsupported(
                format!("a tensor of {class_name}"),
                "save inputs as float32, float16 or uint8 and labels as int64 or int32 (e.g. tensor.float())",
            )
        })?;
        let ints = |object: &Object| -> Option<Vec<usize>> {
            match object {
                Object::Tuple(items) => items.iter().map(|item| usize::try_from(int(item)?).ok()).collect(),
                _ => None,
            }
        };
        let (Some(shape), Some(stride), Some(offset)) = (ints(size), ints(stride), int(offset)) else {
            return Err(malformed());
        };
        if !is_contiguous(&shape, &stride) {
            return Err(self.unsupported(
                format!("a non-contiguous tensor of shape {shape:?} (strides {stride:?})"),
                "save tensor.contiguous() instead of a transposed or strided view",
            ));
        }
        Ok(PtValue::Tensor(PtTensor {
            file: self.path.to_path_buf(),
            entry: format!("{}{key}", self.records),
            dtype,
            shape,
            offset: usize::try_from(offset).map_err(|_| malformed())?,
        }))
    }

    fn class_of(&self, object: Object) -> PtError {
        match object {
            Object::Class { module_name, class_name } => self.forbidden(&module_name, &class_name),
            other => self.unsupported(format!("an object built from {other:?}"), "save only tensors"),
        }
    }

    fn forbidden(&self, module: &str, name: &str) -> PtError {
        PtError::ForbiddenGlobal { path: self.path.to_path_buf(), global: format!("{module}.{name}") }
    }

    fn unsupported(&self, what: String, fix: &str) -> PtError {
        PtError::Unsupported { path: self.path.to_path_buf(), what, fix: fix.into() }
    }
}

fn int(object: &Object) -> Option<i64> {
    match object {
        Object::Int(v) => Some((*v).into()),
        Object::Long(v) => Some(*v),
        _ => None,
    }
}

/// Row-major with no gaps; axes of length 1 may have any stride.
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&len, &step) in shape.iter().zip(stride).rev() {
        if len != 1 && step != expected {
            return false;
        }
        expected *= len;
    }
    shape.len() == stride.len()
}

#[cfg(test)]
mod tests {
    use super::is_contiguous;

    #[test]
    fn contiguity_ignores_unit_axes() {
        assert!(is_contiguous(&[2, 3, 4], &[12, 4, 1]));
        assert!(is_contiguous(&[1, 3, 1], &[99, 1, 7]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(!is_contiguous(&[2, 3], &[6, 1, 1]));
    }
}
