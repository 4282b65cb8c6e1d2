//! A folder of images in torchvision's `ImageFolder` layout: one subfolder
//! per class, the classes indexed in sorted name order, each class's
//! files found by walking its subfolder in sorted order, so that image `i`
//! and its label are the ones `ImageFolder(root)[i]` gives.
//!
//! Two deliberate differences: hidden files and folders (`.DS_Store`,
//! `.ipynb_checkpoints`) are ignored, where torchvision would take a
//! hidden folder for a class; and a `classes` list may fix the order when
//! the folder holds only some of the classes a model scores.

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
        Ok(Self { root: root.to_path_buf(), classes, samples })
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
    fn empty_class_folders_and_folders_without_classes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(ImageFolder::open(dir.path(), None), Err(FolderError::NoClasses { .. })));
        touch(&dir.path().join("a/x.png"));
        std::fs::create_dir(dir.path().join("b")).unwrap();
        let error = ImageFolder::open(dir.path(), None).unwrap_err();
        assert!(error.to_string().contains("/b holds no images"), "{error}");
    }
}
