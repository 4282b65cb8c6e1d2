//! A folder of images in torchvision's `ImageFolder` layout: one subfolder
//! per class, the classes indexed in sorted name order, each class's
//! files found by walking its subfolder in sorted order, so that image `i`
//! and its label are the ones `ImageFolder(root)[i]` gives.
//!
//! Two deliberate differences: hidden files and folders (`.DS_Store`,
//! `.ipynb_checkpoints`) are ignored, where torchvision would take a
//! hidden folder for a class; and a `classes` list may fix the order when
//! the folder holds only some of the classes a model scores.
//!
//! A flat folder can instead come with a labels file of `relative/path
//! label` lines, the `val.txt` convention of ImageNet tools; the images
//! are then taken in the file's order.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The extensions read, as torchvision's `IMG_EXTENSIONS` that the image
/// crate decodes.
const EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "bmp", "webp"];

#[derive(Debug, Error)]
pub enum FolderError {
    #[error("cannot read the image folder {path}: {message}")]
    Unreadable { path: PathBuf, message: String },
    #[error("{root} has no class subfolders\n  fix: put each class's images in a subfolder named for the class (torchvision's ImageFolder layout)")]
    NoClasses { root: PathBuf },
    #[error(
        "class folder {path} holds no images (JPEG, PNG, BMP or WebP)\n  fix: add its images, or remove the folder"
    )]
    EmptyClass { path: PathBuf },
    #[error("{root} has class folder `{class}`, which the `classes` list does not name\n  fix: add `{class}` to the list at its index, or move the folder out")]
    Unlisted { root: PathBuf, class: String },
    #[error("{file}, line {line}: {problem}\n  fix: {fix}")]
    LabelsLine { file: PathBuf, line: usize, problem: String, fix: String },
    #[error("{file} lists no images\n  fix: write one `relative/path label` line per image")]
    NoLabels { file: PathBuf },
}

/// One image and its class index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: u32,
}

/// What the folder holds.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Class names in index order (the `classes` list, or the subfolders).
    pub classes: Vec<String>,
    pub samples: Vec<Sample>,
    /// The labels file the samples were listed from, if any. Without a
    /// `classes` list, its classes are unknown (`classes` is empty).
    pub labels_file: Option<PathBuf>,
}

impl ImageFolder {
    /// Lists the folder. With `classes`, every subfolder must be named
    /// there, and labels are positions in the list.
    pub fn open(root: &Path, classes: Option<&[String]>) -> Result<Self, FolderError> {
        let folders = visible_entries(root)?.into_iter().filter(|p| p.is_dir()).collect::<Vec<_>>();
        if folders.is_empty() {
            return Err(FolderError::NoClasses { root: root.to_path_buf() });
        }
        let name = |path: &Path| path.file_name().expect("a listed entry has a name").to_string_lossy().to_string();
        let classes: Vec<String> = match classes {
            Some(listed) => listed.to_vec(),
            None => folders.iter().map(|f| name(f)).collect(),
        };
        let mut samples = Vec::new();
        for folder in &folders {
            let class = name(folder);
            let label = classes
                .iter()
                .position(|c| *c == class)
                .ok_or_else(|| FolderError::Unlisted { root: root.to_path_buf(), class: class.clone() })?;
            let before = samples.len();
            walk(folder, &mut |path| samples.push(Sample { path, label: label as u32 }))?;
            if samples.len() == before {
                return Err(FolderError::EmptyClass { path: folder.clone() });
            }
        }
        Ok(Self { root: root.to_path_buf(), classes, samples, labels_file: None })
    }

    /// Lists the images a labels file names, in its order. A label is a
    /// class index, or a name from `classes`; blank lines and lines
    /// starting with `#` are skipped. Paths may hold spaces: the label is
    /// the last word.
    pub fn from_labels_file(root: &Path, file: &Path, classes: Option<&[String]>) -> Result<Self, FolderError> {
        let text = std::fs::read_to_string(file).map_err(|e| unreadable(file, e))?;
        let classes = classes.map(<[String]>::to_vec).unwrap_or_default();
        let mut samples = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fail = |problem: String, fix: &str| FolderError::LabelsLine {
                file: file.to_path_buf(),
                line: number + 1,
                problem,
                fix: fix.to_string(),
            };
            let Some((relative, label)) = line.rsplit_once(char::is_whitespace) else {
                return Err(fail(format!("`{line}` has no label"), "write `relative/path label`"));
            };
            let label = match label.parse::<u32>() {
                Ok(index) => index,
                Err(_) => classes.iter().position(|c| c == label).map(|i| i as u32).ok_or_else(|| {
                    fail(
                        format!("label `{label}` is neither a class index nor a name in `classes`"),
                        "use the class's index, or list the class names in the source's `classes`",
                    )
                })?,
            };
            if !classes.is_empty() && label as usize >= classes.len() {
                return Err(fail(
                    format!("label {label} is out of range for the {} classes listed", classes.len()),
                    "fix the label, or list every class in `classes`",
                ));
            }
            let path = root.join(relative.trim_end());
            if !path.is_file() {
                return Err(fail(
                    format!("{} does not exist", path.display()),
                    "paths are relative to the source's `images` folder",
                ));
            }
            samples.push(Sample { path, label });
        }
        if samples.is_empty() {
            return Err(FolderError::NoLabels { file: file.to_path_buf() });
        }
        Ok(Self { root: root.to_path_buf(), classes, samples, labels_file: Some(file.to_path_buf()) })
    }

    /// A fingerprint of what the folder holds: every image's path, size
    /// and modification time, and the class list. Reading every byte of a
    /// 50,000-image folder at each plan would take minutes; a file that is
    /// replaced changes its size or time.
    pub fn fingerprint(&self) -> Result<String, FolderError> {
        let mut hasher = Sha256::new();
        for class in &self.classes {
            hasher.update(class.as_bytes());
            hasher.update([0]);
        }
        for sample in &self.samples {
            let metadata = std::fs::metadata(&sample.path).map_err(|e| unreadable(&sample.path, e))?;
            let modified = metadata.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            let relative = sample.path.strip_prefix(&self.root).unwrap_or(&sample.path);
            hasher.update(relative.to_string_lossy().as_bytes());
            hasher.update(sample.label.to_le_bytes());
            hasher.update(metadata.len().to_le_bytes());
            hasher.update(modified.map_or(0, |t| t.as_nanos()).to_le_bytes());
        }
        Ok(hex::encode(&hasher.finalize()[..16]))
    }
}

fn unreadable(path: &Path, e: std::io::Error) -> FolderError {
    FolderError::Unreadable { path: path.to_path_buf(), message: e.to_string() }
}

/// The entries of `dir` not starting with a dot, sorted by name (byte
/// order, which is code point order, as Python's `sorted` on str).
fn visible_entries(dir: &Path) -> Result<Vec<PathBuf>, FolderError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| unreadable(dir, e))? {
        let entry = entry.map_err(|e| unreadable(dir, e))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            entries.push(entry.path());
        }
    }
    entries.sort();
    Ok(entries)
}

/// The images under `dir`, in the order of torchvision's
/// `sorted(os.walk(dir))` then `sorted(files)`: folders sorted by their
/// whole path as a string (so `sub-x` comes before `sub/deeper`), each
/// folder's files sorted by name.
fn walk(dir: &Path, found: &mut impl FnMut(PathBuf)) -> Result<(), FolderError> {
    let mut folders = vec![(dir.to_string_lossy().to_string(), dir.to_path_buf())];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for sub in visible_entries(&folder)?.into_iter().filter(|p| p.is_dir()) {
            folders.push((sub.to_string_lossy().to_string(), sub.clone()));
            pending.push(sub);
        }
    }
    folders.sort();
    for (_, folder) in folders {
        for file in visible_entries(&folder)?.into_iter().filter(|p| !p.is_dir()) {
            let extension = file.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            if EXTENSIONS.contains(&extension.as_str()) {
                found(file);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn classes_and_files_come_in_sorted_order_and_hidden_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for file in ["dog/b.png", "dog/a.JPG", "dog/sub/deeper/d.png", "dog/sub-x/e.webp", "dog/sub/c.jpeg"]
            .into_iter()
            .chain(["cat/z.bmp", "cat/notes.txt", "cat/.hidden.png"])
        {
            touch(&root.join(file));
        }
        touch(&root.join(".ipynb_checkpoints/x.png"));
        let folder = ImageFolder::open(root, None).unwrap();
        assert_eq!(folder.classes, ["cat", "dog"]);
        let listed: Vec<(String, u32)> = folder
            .samples
            .iter()
            .map(|s| (s.path.strip_prefix(root).unwrap().display().to_string(), s.label))
            .collect();
        let expected =
            ["cat/z.bmp", "dog/a.JPG", "dog/b.png", "dog/sub/c.jpeg", "dog/sub-x/e.webp", "dog/sub/deeper/d.png"];
        let labels = [0, 1, 1, 1, 1, 1];
        let expected: Vec<(String, u32)> = expected.iter().map(|p| p.to_string()).zip(labels).collect();
        assert_eq!(listed, expected);
    }

    #[test]
    fn a_classes_list_fixes_the_indices_and_must_cover_the_folders() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("dog/a.png"));
        let classes = ["ant".to_string(), "cat".to_string(), "dog".to_string()];
        let folder = ImageFolder::open(dir.path(), Some(&classes)).unwrap();
        assert_eq!(folder.samples[0].label, 2);
        touch(&dir.path().join("emu/a.png"));
        let error = ImageFolder::open(dir.path(), Some(&classes)).unwrap_err();
        assert!(error.to_string().contains("`emu`"), "{error}");
    }

    #[test]
    fn a_labels_file_lists_a_flat_folder_in_its_order() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["b.png", "a b.jpg", "c.png"] {
            touch(&dir.path().join(file));
        }
        let labels = dir.path().join("val.txt");
        std::fs::write(&labels, "# path label\nb.png 3\n\na b.jpg  dog\nc.png 0\n").unwrap();
        let classes: Vec<String> = ["cat", "ant", "dog", "emu"].map(String::from).to_vec();
        let folder = ImageFolder::from_labels_file(dir.path(), &labels, Some(&classes)).unwrap();
        let listed: Vec<(String, u32)> =
            folder.samples.iter().map(|s| (s.path.file_name().unwrap().to_string_lossy().into(), s.label)).collect();
        assert_eq!(listed, [("b.png".into(), 3), ("a b.jpg".into(), 2), ("c.png".into(), 0)]);

        std::fs::write(&labels, "b.png 3\nmissing.png 1\n").unwrap();
        let error = ImageFolder::from_labels_file(dir.path(), &labels, None).unwrap_err().to_string();
        assert!(error.contains("val.txt, line 2") && error.contains("missing.png does not exist"), "{error}");
        std::fs::write(&labels, "b.png\n").unwrap();
        let error = ImageFolder::from_labels_file(dir.path(), &labels, None).unwrap_err().to_string();
        assert!(error.contains("line 1: `b.png` has no label"), "{error}");
        std::fs::write(&labels, "b.png 4\n").unwrap();
        let error = ImageFolder::from_labels_file(dir.path(), &labels, Some(&classes)).unwrap_err().to_string();
        assert!(error.contains("label 4 is out of range for the 4 classes"), "{error}");
    }

    #[test]
    fn empty_class_folders_and_folders_without_classes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(ImageFolder::open(dir.path(), None), Err(FolderError::NoClasses { .. })));
        touch(&dir.path().join("a/x.png"));
        std::fs::create_dir(dir.path().join("b")).unwrap();
        let error = ImageFolder::open(dir.path(), None).unwrap_err();
        assert!(error.to_string().contains("/b holds no images"), "{error}");
    }
}
