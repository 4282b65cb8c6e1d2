//! Tensor files of already preprocessed inputs, with optional labels:
//! `.npy`, `.npz`, `.pt` (torch.save) or a directory of `.pt` files.
//!
//! Opening a source reads only headers and labels: the inputs stay on disk
//! as a list of blocks (a tensor's bytes inside a file or a zip entry), and
//! `read_raw_rows` streams the rows a stage asks for as stored (`read_rows`
//! converted to f32), so no split is ever in memory whole. A `.pt` file's object decides the layout:
//! a tensor; a dict (keys configurable); a list or tuple of tensors; an
//! `(inputs, labels)` pair; or a list of `(input, label)` pairs. Inputs may
//! be f32, f16 or u8 (u8 gets the spec's scale, mean and std), labels i64,
//! i32 or u8.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use super::prepared::Normalize;
use super::pt_file::{self, PtError, PtTensor, PtValue};

/// The element types qsweep reads from tensor files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    F16,
    U8,
    I32,
    I64,
}

impl Dtype {
    /// PyTorch's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
            Dtype::F16 => "float16",
            Dtype::U8 => "uint8",
            Dtype::I32 => "int32",
            Dtype::I64 => "int64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
        }
    }

    /// The type of a `torch.<Name>Storage`.
    pub fn of_storage(class: &str) -> Option<Self> {
        Some(match class {
            "FloatStorage" => Dtype::F32,
            "DoubleStorage" => Dtype::F64,
            "HalfStorage" => Dtype::F16,
            "ByteStorage" => Dtype::U8,
            "IntStorage" => Dtype::I32,
            "LongStorage" => Dtype::I64,
            _ => return None,
        })
    }

    /// The type of a little-endian NumPy descriptor (`<f4`, `|u1`, ...).
    fn of_npy(descr: &str) -> Option<Self> {
        Some(match descr {
            "<f4" => Dtype::F32,
            "<f8" => Dtype::F64,
            "<f2" => Dtype::F16,
            "|u1" | "<u1" => Dtype::U8,
            "<i4" => Dtype::I32,
            "<i8" => Dtype::I64,
            _ => return None,
        })
    }

    fn is_input(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::U8)
    }

    fn is_label(self) -> bool {
        matches!(self, Dtype::I64 | Dtype::I32 | Dtype::U8)
    }

    /// Little-endian bytes of this type to f64, exactly for every value.
    fn decode(self, bytes: &[u8]) -> impl Iterator<Item = f64> + '_ {
        bytes.chunks_exact(self.size()).map(move |b| match self {
            Dtype::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
            Dtype::F64 => f64::from_le_bytes(b.try_into().unwrap()),
            Dtype::F16 => half::f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
            Dtype::U8 => b[0] as f64,
            Dtype::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
            Dtype::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f64,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error(transparent)]
    Pt(#[from] PtError),
    #[error("{path}: {problem}\n  fix: {fix}")]
    Bad { path: PathBuf, problem: String, fix: String },
}

fn bad(path: &Path, problem: impl Into<String>, fix: impl Into<String>) -> TensorError {
    TensorError::Bad { path: path.to_path_buf(), problem: problem.into(), fix: fix.into() }
}

fn io_error(path: &Path, error: impl std::fmt::Display) -> TensorError {
    bad(path, format!("cannot be read: {error}"), "check that the file is complete and readable")
}

/// Where a block's bytes start.
#[derive(Debug, Clone)]
enum Place {
    /// At a byte offset of a plain file (`.npy`).
    File { offset: u64 },
    /// In a zip entry, after an npy header if `npy`, then `skip` bytes.
    Zip { entry: String, npy: bool, skip: u64 },
}

/// Consecutive rows of one tensor.
#[derive(Debug, Clone)]
struct Block {
    file: PathBuf,
    place: Place,
    dtype: Dtype,
    rows: usize,
}

/// Which entries of a dict or `.npz` hold the inputs and the labels.
pub struct Keys<'a> {
    /// The spec's `input_key` [default: the model's input name, else `images`].
    pub input: Option<&'a str>,
    /// The spec's `label_key` [default: `labels`, if present].
    pub labels: Option<&'a str>,
    /// The model's input name.
    pub model_input: &'a str,
}

impl Keys<'_> {
    fn input_candidates(&self) -> Vec<&str> {
        match self.input {
            Some(key) => vec![key],
            None => vec![self.model_input, "images"],
        }
    }

    fn label_key(&self) -> &str {
        self.labels.unwrap_or("labels")
    }
}

/// An opened tensor source: its inputs as blocks on disk, its labels read.
#[derive(Debug)]
pub struct TensorSet {
    pub path: PathBuf,
    /// One input's shape, without the batch axis.
    pub sample_shape: Vec<usize>,
    pub labels: Option<Vec<i64>>,
    /// The input element types, for messages and scaling.
    pub dtypes: Vec<Dtype>,
    blocks: Vec<Block>,
}

impl TensorSet {
    /// Opens `path` (a `.npy`, `.npz`, `.pt`, or directory of `.pt`),
    /// whose samples have `sample_rank` axes.
    pub fn open(path: &Path, keys: &Keys<'_>, sample_rank: usize) -> Result<Self, TensorError> {
        let mut parts = Vec::new();
        if path.is_dir() {
            let files = pt_files(path)?;
            if files.is_empty() {
                return Err(bad(
                    path,
                    "the folder holds no .pt or .pth files",
                    "name a folder of torch.save files, or a single .pt, .npy or .npz file",
                ));
            }
            for file in files {
                parts.push(Part::of_value(&file, pt_file::load(&file)?, keys, sample_rank)?);
            }
        } else {
            crate::files::regular_file(path).map_err(|e| io_error(path, e))?;
            let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
            parts.push(match extension.as_str() {
                "npy" => Part::of_npy(path)?,
                "npz" => Part::of_npz(path, keys)?,
                _ => Part::of_value(path, pt_file::load(path)?, keys, sample_rank)?,
            });
        }
        Self::join(path, parts, sample_rank)
    }

    fn join(path: &Path, parts: Vec<Part>, sample_rank: usize) -> Result<Self, TensorError> {
        let mut set = TensorSet {
            path: path.to_path_buf(),
            sample_shape: Vec::new(),
            labels: parts.first().and_then(|p| p.labels.as_ref()).map(|_| Vec::new()),
            dtypes: Vec::new(),
            blocks: Vec::new(),
        };
        for part in parts {
            for (block, shape) in part.inputs {
                if shape.len() != sample_rank {
                    return Err(bad(
                        &block.file,
                        format!("holds inputs of shape {shape:?} per sample, but the model takes {sample_rank}-axis samples"),
                        "save a batch [N, channels, height, width] (or one sample per tensor) as the model takes it",
                    ));
                }
                if set.blocks.is_empty() {
                    set.sample_shape = shape;
                } else if shape != set.sample_shape {
                    return Err(bad(
                        &block.file,
                        format!("holds samples of shape {shape:?}, but earlier ones are {:?}", set.sample_shape),
                        "give every sample the same shape",
                    ));
                }
                if !set.dtypes.contains(&block.dtype) {
                    set.dtypes.push(block.dtype);
                }
                set.blocks.push(block);
            }
            match (&mut set.labels, part.labels) {
                (Some(all), Some(labels)) => all.extend(labels),
                (None, None) => {}
                _ => {
                    return Err(bad(
                        &part.file,
                        "has labels where other files have none, or none where they have some",
                        "save labels with every file of the folder, or with none",
                    ))
                }
            }
        }
        if set.blocks.is_empty() || set.is_empty() {
            return Err(bad(path, "holds no samples", "save at least one input"));
        }
        if let Some(labels) = &set.labels {
            if labels.len() != set.len() {
                return Err(bad(
                    path,
                    format!("holds {} inputs but {} labels", set.len(), labels.len()),
                    "save one label per input",
                ));
            }
        }
        Ok(set)
    }

    /// How many samples the source holds.
    pub fn len(&self) -> usize {
        self.blocks.iter().map(|b| b.rows).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A fingerprint of the files the source reads: paths, sizes and
    /// modification times, as an image folder's (contents are not hashed,
    /// so a large file costs nothing to check).
    pub fn fingerprint(&self) -> Result<String, TensorError> {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let mut files: Vec<&PathBuf> = self.blocks.iter().map(|b| &b.file).collect();
        files.dedup();
        for file in files {
            let meta = std::fs::metadata(file).map_err(|e| io_error(file, e))?;
            let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            hasher.update(format!("{}\0{}\0{:?}\n", file.display(), meta.len(), modified).as_bytes());
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// The one element type every input block is stored in, if they agree.
    pub fn uniform_dtype(&self) -> Option<Dtype> {
        let first = self.blocks.first()?.dtype;
        self.blocks.iter().all(|b| b.dtype == first).then_some(first)
    }

    /// Streams the samples at `indices` (ascending) to `each`, in order,
    /// as their files store them.
    pub fn read_raw_rows<E: From<TensorError>>(
        &self,
        indices: &[usize],
        mut each: impl FnMut(RawRow<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let row_len: usize = self.sample_shape.iter().product();
        let mut wanted = indices.iter().copied().peekable();
        let mut start = 0;
        for block in &self.blocks {
            let end = start + block.rows;
            if wanted.peek().is_some_and(|&i| i < end) {
                let row_bytes = (row_len * block.dtype.size()) as u64;
                let mut bytes = vec![0u8; row_bytes as usize];
                let io = |e: std::io::Error| io_error(&block.file, e);
                block.with_reader(&mut |reader| -> Result<(), E> {
                    let mut position = start;
                    while let Some(index) = wanted.next_if(|&i| i < end) {
                        std::io::copy(&mut reader.take((index - position) as u64 * row_bytes), &mut std::io::sink())
                            .map_err(io)?;
                        reader.read_exact(&mut bytes).map_err(io)?;
                        position = index + 1;
                        each(RawRow { index, dtype: block.dtype, bytes: &bytes, file: &block.file })?;
                    }
                    Ok(())
                })?;
            }
            start = end;
        }
        Ok(())
    }

    /// Streams the samples at `indices` (ascending) to `each`, in order,
    /// as f32 model inputs (u8 ones normalised). Fails on NaN or Inf,
    /// naming the sample.
    pub fn read_rows<E: From<TensorError>>(
        &self,
        indices: &[usize],
        normalize: &Normalize,
        mut each: impl FnMut(&[f32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut values = vec![0f32; self.sample_shape.iter().product()];
        self.read_raw_rows(indices, |row| {
            row.to_f32(&mut values)?;
            if row.dtype == Dtype::U8 {
                normalize.apply(&self.sample_shape, &mut values);
            }
            each(&values)
        })
    }
}

/// One sample as its file stores it.
pub struct RawRow<'a> {
    pub index: usize,
    pub dtype: Dtype,
    pub bytes: &'a [u8],
    pub file: &'a Path,
}

impl RawRow<'_> {
    /// The values as f32; an error naming the sample if one is NaN or Inf.
    pub fn to_f32(&self, values: &mut [f32]) -> Result<(), TensorError> {
        for (value, decoded) in values.iter_mut().zip(self.dtype.decode(self.bytes)) {
            *value = decoded as f32;
        }
        match values.iter().position(|v| !v.is_finite()) {
            Some(at) => Err(bad(
                self.file,
                format!("sample {} holds {} at element {at}", self.index, values[at]),
                "remove or repair the sample: inputs must be finite",
            )),
            None => Ok(()),
        }
    }
}

impl Block {
    /// Runs `read` on a reader positioned at the block's first byte.
    fn with_reader<E: From<TensorError>>(&self, read: &mut dyn FnMut(&mut dyn Read) -> Result<(), E>) -> Result<(), E> {
        let io = |e: std::io::Error| io_error(&self.file, e);
        let file = std::fs::File::open(&self.file).map_err(io)?;
        match &self.place {
            Place::File { offset } => {
                let mut reader = std::io::BufReader::new(file);
                reader.seek(std::io::SeekFrom::Start(*offset)).map_err(io)?;
                read(&mut reader)
            }
            Place::Zip { entry, npy, skip } => {
                let zip_error = |e: zip::result::ZipError| io_error(&self.file, e);
                let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(zip_error)?;
                let mut reader = std::io::BufReader::new(archive.by_name(entry).map_err(zip_error)?);
                if *npy {
                    ndarray_npy::npy::header::Header::from_reader(&mut reader).map_err(|e| io_error(&self.file, e))?;
                }
                std::io::copy(&mut (&mut reader).take(*skip), &mut std::io::sink()).map_err(io)?;
                read(&mut reader)
            }
        }
    }

    /// Reads the whole block as integer labels.
    fn labels(&self) -> Result<Vec<i64>, TensorError> {
        let mut labels = Vec::with_capacity(self.rows);
        self.with_reader(&mut |reader| -> Result<(), TensorError> {
            let mut bytes = vec![0u8; self.rows * self.dtype.size()];
            reader.read_exact(&mut bytes).map_err(|e| io_error(&self.file, e))?;
            labels.extend(self.dtype.decode(&bytes).map(|v| v as i64));
            Ok(())
        })?;
        Ok(labels)
    }
}

/// What one file contributes: input blocks with their sample shapes, and
/// labels if it has them.
struct Part {
    file: PathBuf,
    inputs: Vec<(Block, Vec<usize>)>,
    labels: Option<Vec<i64>>,
}

impl Part {
    fn of_npy(path: &Path) -> Result<Self, TensorError> {
        let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(|e| io_error(path, e))?);
        let header = npy_header(path, &mut reader)?;
        let offset = reader.stream_position().map_err(|e| io_error(path, e))?;
        let (dtype, shape) = header;
        let block = input_block(path, Place::File { offset }, dtype, &shape, "the array")?;
        Ok(Part { file: path.to_path_buf(), inputs: vec![block], labels: None })
    }

    fn of_npz(path: &Path, keys: &Keys<'_>) -> Result<Self, TensorError> {
        let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
        let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| io_error(path, e))?;
        let names: Vec<String> = archive
            .file_names()
            .filter_map(Result::ok)
            .filter_map(|n| n.strip_suffix(".npy").map(str::to_string))
            .collect();
        let mut header = |name: &str| -> Result<(Dtype, Vec<usize>), TensorError> {
            let entry = archive.by_name(&format!("{name}.npy")).map_err(|e| io_error(path, e))?;
            npy_header(path, &mut std::io::BufReader::new(entry))
        };
        let candidates = keys.input_candidates();
        let Some(input) = candidates.iter().find(|key| names.iter().any(|n| n == *key)) else {
            return Err(bad(
                path,
                format!("holds no array named {} (it holds: {})", or_list(&candidates), names.join(", ")),
                "set the source's input_key to the array that holds the inputs, or save it under the model's input name",
            ));
        };
        let place = |name: &str| Place::Zip { entry: format!("{name}.npy"), npy: true, skip: 0 };
        let (dtype, shape) = header(input)?;
        let inputs = vec![input_block(path, place(input), dtype, &shape, &format!("array `{input}`"))?];
        let label_key = keys.label_key();
        let labels = if names.iter().any(|n| n == label_key) {
            let (dtype, shape) = header(label_key)?;
            Some(label_block(path, place(label_key), dtype, &shape, &format!("array `{label_key}`"))?.labels()?)
        } else if keys.labels.is_some() {
            return Err(bad(
                path,
                format!("holds no array named `{label_key}` (it holds: {})", names.join(", ")),
                "set label_key to the array that holds the labels",
            ));
        } else {
            None
        };
        Ok(Part { file: path.to_path_buf(), inputs, labels })
    }

    /// The inputs and labels of a `.pt` file's object.
    fn of_value(path: &Path, value: PtValue, keys: &Keys<'_>, sample_rank: usize) -> Result<Self, TensorError> {
        let mut part = Part { file: path.to_path_buf(), inputs: Vec::new(), labels: None };
        let tensor_input = |tensor: &PtTensor, what: &str| -> Result<(Block, Vec<usize>), TensorError> {
            // One sample, or a batch of them.
            let shape = if tensor.shape.len() == sample_rank {
                [&[1], &tensor.shape[..]].concat()
            } else {
                tensor.shape.clone()
            };
            input_block(path, pt_place(tensor), tensor.dtype, &shape, what)
        };
        let is_labels =
            |value: &PtValue| matches!(value, PtValue::Tensor(t) if t.dtype.is_label() && t.shape.len() <= 1);
        match value {
            PtValue::Tensor(tensor) => part.inputs.push(tensor_input(&tensor, "the tensor")?),
            PtValue::Dict(entries) => {
                let mut names: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
                names.sort_unstable();
                let candidates = keys.input_candidates();
                let Some((key, input)) = entries.iter().find(|(k, _)| candidates.contains(&k.as_str())) else {
                    return Err(bad(
                        path,
                        format!("is a dict with no key {} (its keys: {})", or_list(&candidates), names.join(", ")),
                        "set the source's input_key to the key that holds the inputs",
                    ));
                };
                let PtValue::Tensor(tensor) = input else {
                    return Err(bad(
                        path,
                        format!("key `{key}` holds {}, not a tensor", input.kind()),
                        "save the inputs as one tensor [N, ...] under that key",
                    ));
                };
                part.inputs.push(tensor_input(tensor, &format!("key `{key}`"))?);
                let label_key = keys.label_key();
                match entries.iter().find(|(k, _)| k == label_key) {
                    Some((_, PtValue::Tensor(labels))) => {
                        part.labels = Some(pt_labels(path, labels, &format!("key `{label_key}`"))?)
                    }
                    Some((_, other)) => {
                        return Err(bad(
                            path,
                            format!("key `{label_key}` holds {}, not a tensor of labels", other.kind()),
                            "save the labels as an int64 tensor [N]",
                        ))
                    }
                    None if keys.labels.is_some() => {
                        return Err(bad(
                            path,
                            format!("is a dict with no key `{label_key}` (its keys: {})", names.join(", ")),
                            "set label_key to the key that holds the labels",
                        ))
                    }
                    None => {}
                }
            }
            PtValue::Sequence(items) => match items.as_slice() {
                [PtValue::Tensor(inputs), labels @ PtValue::Tensor(_)]
                    if is_labels(labels) && inputs.shape.len() > 1 =>
                {
                    let PtValue::Tensor(labels) = labels else { unreachable!() };
                    part.inputs.push(tensor_input(inputs, "item 0")?);
                    part.labels = Some(pt_labels(path, labels, "item 1")?);
                }
                _ if items.iter().all(|item| matches!(item, PtValue::Tensor(_))) => {
                    for (index, item) in items.iter().enumerate() {
                        let PtValue::Tensor(tensor) = item else { unreachable!() };
                        part.inputs.push(tensor_input(tensor, &format!("item {index}"))?);
                    }
                }
                _ => {
                    let mut labels = Vec::new();
                    for (index, item) in items.iter().enumerate() {
                        let pair = match item {
                            PtValue::Sequence(pair) => pair.as_slice(),
                            _ => &[],
                        };
                        let [PtValue::Tensor(input), label] = pair else {
                            return Err(bad(
                                path,
                                format!("item {index} is {}, not an input tensor or an (input, label) pair", item.kind()),
                                "save a tensor, a dict of tensors, a list of tensors, or a list of (input, label) pairs",
                            ));
                        };
                        let what = format!("item {index}");
                        let block = tensor_input(input, &what)?;
                        match label {
                            PtValue::Int(label) if block.0.rows == 1 => labels.push(*label),
                            PtValue::Tensor(tensor) => labels.extend(pt_labels(path, tensor, &what)?),
                            other => {
                                return Err(bad(
                                    path,
                                    format!("{what} has a label that is {}", other.kind()),
                                    "give each pair an int label (or a tensor of labels for a batch)",
                                ))
                            }
                        }
                        part.inputs.push(block);
                    }
                    part.labels = Some(labels);
                }
            },
            other => {
                return Err(bad(
                    path,
                    format!("holds {}, not tensors", other.kind()),
                    "save a tensor, a dict of tensors, a list of tensors, or a list of (input, label) pairs",
                ))
            }
        }
        Ok(part)
    }
}

/// Reads an npy header: its type and shape, C order only.
fn npy_header(path: &Path, reader: &mut impl Read) -> Result<(Dtype, Vec<usize>), TensorError> {
    let header = ndarray_npy::npy::header::Header::from_reader(reader)
        .map_err(|e| bad(path, format!("is not a NumPy array file: {e}"), "save it with numpy.save or numpy.savez"))?;
    let descr = header.type_descriptor.to_string();
    let descr = descr.trim_matches('\'');
    let dtype = Dtype::of_npy(descr).ok_or_else(|| {
        bad(
            path,
            format!("holds elements of NumPy type {descr}"),
            "save inputs as float32, float16 or uint8 and labels as int64 or int32, little-endian",
        )
    })?;
    if header.layout.is_fortran() {
        return Err(bad(path, "holds a Fortran-ordered array", "save numpy.ascontiguousarray(array)"));
    }
    Ok((dtype, header.shape))
}

fn pt_place(tensor: &PtTensor) -> Place {
    Place::Zip { entry: tensor.entry.clone(), npy: false, skip: (tensor.offset * tensor.dtype.size()) as u64 }
}

fn input_block(
    file: &Path,
    place: Place,
    dtype: Dtype,
    shape: &[usize],
    what: &str,
) -> Result<(Block, Vec<usize>), TensorError> {
    if !dtype.is_input() {
        return Err(bad(
            file,
            format!("{what} holds {} inputs", dtype.name()),
            "save inputs as float32, float16 or uint8 (e.g. tensor.float())",
        ));
    }
    let Some((&rows, sample)) = shape.split_first() else {
        return Err(bad(file, format!("{what} is a scalar, not inputs"), "save inputs as a tensor [N, ...]"));
    };
    Ok((Block { file: file.to_path_buf(), place, dtype, rows }, sample.to_vec()))
}

fn label_block(file: &Path, place: Place, dtype: Dtype, shape: &[usize], what: &str) -> Result<Block, TensorError> {
    if !dtype.is_label() || shape.len() > 1 {
        return Err(bad(
            file,
            format!("{what} holds {} of shape {shape:?}, not a list of class indices", dtype.name()),
            "save labels as an int64 or int32 tensor of shape [N]",
        ));
    }
    Ok(Block { file: file.to_path_buf(), place, dtype, rows: shape.first().copied().unwrap_or(1) })
}

fn pt_labels(file: &Path, tensor: &PtTensor, what: &str) -> Result<Vec<i64>, TensorError> {
    label_block(file, pt_place(tensor), tensor.dtype, &tensor.shape, what)?.labels()
}

/// The `.pt` and `.pth` files of a folder, sorted by name, hidden skipped.
fn pt_files(dir: &Path) -> Result<Vec<PathBuf>, TensorError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let path = entry.map_err(|e| io_error(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
        if !name.starts_with('.') && path.is_file() && matches!(extension.as_str(), "pt" | "pth") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn or_list(keys: &[&str]) -> String {
    keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" or ")
}
