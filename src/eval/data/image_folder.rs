//! An image-folder tree as torchvision's `ImageFolder` reads it: one folder per class, classes
//! numbered in sorted name order (byte order, as Python's `sorted`), the files of a class found
//! by walking its folder (sub-folders included) and taken in sorted path order. PNG and JPEG
//! files are read (by content; `.png`, `.jpg`, `.jpeg` in any case); other files are ignored,
//! except images of a format relucompile does not decode (`.bmp`, `.webp`, ...), which are an
//! error rather than silently left out.
//!
//! `train/` and `test/` (or `val/`) folders directly under the root give the splits; classes
//! are numbered from `train/`'s folders (a test class without a training folder is an
//! error). A root without them is one set, read for both splits (like a `.npy` file).
//! Grey images (also grey with alpha, 16-bit) decode to one channel, colour to three (alpha
//! dropped, as torchvision's `convert("RGB")`); [`super::Fit`] then converts and resizes.

use super::fit::Conversions;
use super::{Fit, Split, Stored};
use crate::error::CompileError;
use anyhow::Result;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Extensions decoded.
const DECODED: &[&str] = &["png", "jpg", "jpeg"];
/// Image extensions torchvision reads and relucompile does not: an error, so that the set is
/// never silently smaller than the one the model was measured on.
const NOT_DECODED: &[&str] = &["bmp", "ppm", "pgm", "tif", "tiff", "webp", "gif"];

/// Whether `dir` holds at least one folder (a class or a split): an image-folder tree.
pub(super) fn holds_folders(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| entries.flatten().any(|e| e.path().is_dir()))
}

/// The split folders: `(train, test)` where they exist, or `None` for a tree without splits.
fn split_folders(root: &Path) -> Option<(Option<PathBuf>, Option<PathBuf>)> {
    let dir = |name: &str| Some(root.join(name)).filter(|p| p.is_dir());
    let train = dir("train");
    let test = dir("test").or_else(|| dir("val"));
    (train.is_some() || test.is_some()).then_some((train, test))
}

/// Whether the tree has `train/` and `test/` (or `val/`) folders.
pub(super) fn has_splits(root: &Path) -> bool {
    split_folders(root).is_some()
}

fn invalid(msg: String) -> anyhow::Error {
    CompileError::invalid_data(msg).into()
}

/// Sub-folder names of `dir`, sorted.
fn class_names(dir: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| invalid(format!("cannot read the folder {}: {e}", dir.display())))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(invalid(format!(
            "{} holds no class folders: an image-folder tree has one folder of images per class",
            dir.display()
        )));
    }
    Ok(names)
}

/// The image files of `split` with their labels, in `ImageFolder` order.
pub fn list(root: &Path, split: Split) -> Result<Vec<(PathBuf, u32)>> {
    let (folder, classes) = match split_folders(root) {
        None => (root.to_path_buf(), class_names(root)?),
        Some((train, test)) => {
            let folder = match split {
                Split::Train => train.clone(),
                Split::Test => test,
            }
            .ok_or_else(|| {
                invalid(format!(
                    "{} has no {} folder (expected {})",
                    root.display(),
                    split,
                    match split {
                        Split::Train => "train/",
                        Split::Test => "test/ or val/",
                    }
                ))
            })?;
            let classes = class_names(train.as_deref().unwrap_or(&folder))?;
            if let Some(stray) = class_names(&folder)?.into_iter().find(|c| !classes.contains(c)) {
                return Err(invalid(format!(
                    "{} has no counterpart in {}: classes are numbered from the training \
                     folders",
                    folder.join(&stray).display(),
                    root.join("train").display()
                )));
            }
            (folder, classes)
        }
    };
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = folder.join(class);
        if !dir.is_dir() {
            continue; // a class the training split has and this one lacks
        }
        let found = walk(&dir)?;
        if found.is_empty() {
            return Err(invalid(format!(
                "the class folder {} holds no PNG or JPEG images",
                dir.display()
            )));
        }
        files.extend(found.into_iter().map(|f| (f, label as u32)));
    }
    Ok(files)
}

/// The image files under `dir`, ordered as Python's `sorted(os.walk(dir))` then sorted file
/// names order them: by folder path (as a string), then by name.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(String, String, PathBuf)> = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| invalid(format!("cannot read the folder {}: {e}", d.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let ext =
                path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
            if NOT_DECODED.contains(&ext.as_str()) {
                return Err(invalid(format!(
                    "{}: relucompile reads PNG and JPEG images only; convert it or remove it",
                    path.display()
                )));
            }
            if DECODED.contains(&ext.as_str()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                found.push((d.to_string_lossy().into_owned(), name, path));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, _, p)| p).collect())
}

/// Decode one file to planes (`[C, H, W]`, values 0..255): one channel for grey images, three
/// for colour, or always three when `rgb`.
fn decode(file: &Path, rgb: bool) -> Result<(Vec<f32>, [usize; 3])> {
    let bytes =
        std::fs::read(file).map_err(|e| invalid(format!("cannot read {}: {e}", file.display())))?;
    let img = image::io::Reader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(format!("cannot read {}: {e}", file.display())))?
        .decode()
        .map_err(|e| {
            invalid(format!("{}: not a readable PNG or JPEG image: {e}", file.display()))
        })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if !rgb && !img.color().has_color() {
        let grey = img.to_luma8();
        return Ok((grey.into_raw().into_iter().map(f32::from).collect(), [1, h, w]));
    }
    let pixels = img.to_rgb8().into_raw();
    let mut planes = vec![0f32; 3 * h * w];
    for (i, px) in pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            planes[c * h * w + i] = f32::from(px[c]);
        }
    }
    Ok((planes, [3, h, w]))
}

/// The images of `split` (the first `limit` in `ImageFolder` order), decoded in parallel and
/// fitted one by one; notes say what was converted.
pub(super) fn load(
    root: &Path,
    split: Split,
    limit: Option<usize>,
    fit: &Fit,
) -> Result<(Stored, Vec<String>)> {
    let mut files = list(root, split)?;
    files.truncate(limit.unwrap_or(usize::MAX));
    // Without a model to fit, images are RGB (torchvision's default loader).
    let rgb = fit.target().is_none();
    let fitted: Vec<Result<(Vec<f32>, super::fit::Plan)>> = files
        .par_iter()
        .map(|(file, _)| {
            let (planes, shape) = decode(file, rgb)?;
            let plan = fit.plan(shape, &format!("{} is", file.display()))?;
            Ok((plan.apply(&planes), plan))
        })
        .collect();
    let mut images = Vec::new();
    let mut conversions = Conversions::default();
    let mut first: Option<([usize; 3], &Path)> = None;
    for (result, (file, _)) in fitted.into_iter().zip(&files) {
        let (values, plan) = result?;
        let shape = plan.out_shape();
        match first {
            None => first = Some((shape, file)),
            Some((s, f)) if s != shape => {
                return Err(invalid(format!(
                    "{} is {} but {} is {}: images of different sizes need --resize and \
                     --center-crop",
                    file.display(),
                    super::shape_text(&shape),
                    f.display(),
                    super::shape_text(&s)
                )))
            }
            Some(_) => {}
        }
        conversions.count(&plan, 1);
        images.extend(values);
    }
    let source = root.display().to_string();
    let notes = fit.notes(&conversions, &source);
    let sample_shape = first.map_or(vec![3, 0, 0], |(s, _)| s.to_vec());
    let labels = files.iter().map(|(_, l)| *l).collect();
    Ok((Stored { images, labels, sample_shape, source, normalised: false }, notes))
}
