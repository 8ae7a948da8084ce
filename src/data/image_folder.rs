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
            None => {
                images.reserve(files.len() * shape.iter().product::<usize>());
                first = Some((shape, file));
            }
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

#[cfg(test)]
mod tests {
    use super::super::test_util::assert_data_error;
    use super::super::{load, load_fitted, resolve_spec, Normalisation, Source};
    use super::*;
    use image::{GrayImage, ImageFormat, Rgb, RgbImage, RgbaImage};

    /// A `w`x`h` RGB image whose pixel (x, y) is (seed, x, y).
    fn rgb(w: u32, h: u32, seed: u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([seed, x as u8, y as u8]))
    }

    fn save(root: &Path, rel: &str, img: image::DynamicImage) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let format = ImageFormat::from_path(&path).unwrap();
        img.save_with_format(&path, format).unwrap();
    }

    fn identity() -> Normalisation {
        Normalisation::identity()
    }

    fn rel(root: &Path, files: &[(PathBuf, u32)]) -> Vec<(String, u32)> {
        files
            .iter()
            .map(|(p, l)| (p.strip_prefix(root).unwrap().display().to_string(), *l))
            .collect()
    }

    #[test]
    fn order_and_labels_follow_image_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Classes sort by bytes: "B" < "a" < "a b" < "a-b"; files by folder, then name.
        for (i, f) in
            ["a/2.png", "a/1.PNG", "a/z/0.png", "a/y.png", "B/x.jpg", "a-b/q.jpeg", "a b/r.png"]
                .iter()
                .enumerate()
        {
            let img = image::DynamicImage::ImageRgb8(rgb(4, 4, i as u8));
            let format = if f.ends_with("png") || f.ends_with("PNG") { "p" } else { "j" };
            let path = root.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let fmt = if format == "p" { ImageFormat::Png } else { ImageFormat::Jpeg };
            img.save_with_format(&path, fmt).unwrap();
        }
        std::fs::write(root.join("a/notes.txt"), "not an image").unwrap();
        std::fs::write(root.join("stray.png"), "files beside the classes are ignored").unwrap();
        let files = list(root, Split::Test).unwrap();
        let want = [
            ("B/x.jpg", 0),
            ("a/1.PNG", 1),
            ("a/2.png", 1),
            ("a/y.png", 1),
            ("a/z/0.png", 1),
            ("a b/r.png", 2),
            ("a-b/q.jpeg", 3),
        ];
        let want: Vec<(String, u32)> = want.iter().map(|(p, l)| (p.to_string(), *l)).collect();
        assert_eq!(rel(root, &files), want);
        // Without splits, both splits read the whole tree.
        assert_eq!(list(root, Split::Train).unwrap(), files);
        assert!(matches!(resolve_spec(&root.display().to_string()), Ok(Source::ImageFolder(_))));
        assert!(!resolve_spec(&root.display().to_string()).unwrap().has_splits());
        // Pixels: channel planes in order; --limit takes the first in that order.
        let d = load(&root.display().to_string(), Split::Test, Some(2), &identity()).unwrap();
        assert_eq!(
            (d.len(), d.sample_shape.clone(), d.labels.clone()),
            (2, vec![3, 4, 4], vec![0, 1])
        );
        // a/1.PNG was written second (seed 1): R plane 1, G plane x, B plane y.
        let img = d.sample(1);
        assert_eq!(&img[..16], &[1.0; 16]);
        assert_eq!(img[16 + 5], 1.0); // x of pixel 5 (row 1, column 1)
        assert_eq!(img[32 + 4], 1.0); // y of pixel 4 (row 1, column 0)
    }

    #[test]
    fn splits_and_their_classes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for rel in ["train/cat/a.png", "train/dog/a.png", "train/emu/a.png", "val/dog/b.png"] {
            save(root, rel, image::DynamicImage::ImageRgb8(rgb(2, 2, 9)));
        }
        let spec = root.display().to_string();
        assert!(resolve_spec(&spec).unwrap().has_splits());
        // val/ stands for test/; its classes are numbered from train/ (dog is 1, not 0).
        assert_eq!(rel(root, &list(root, Split::Test).unwrap()), [("val/dog/b.png".into(), 1)]);
        assert_eq!(list(root, Split::Train).unwrap().len(), 3);
        // A test class the training split lacks.
        save(root, "val/fox/c.png", image::DynamicImage::ImageRgb8(rgb(2, 2, 9)));
        assert_data_error(load(&spec, Split::Test, None, &identity()), &["fox", "no counterpart"]);
        std::fs::remove_dir_all(root.join("val/fox")).unwrap();
        // An empty class folder, and a format relucompile does not decode.
        std::fs::create_dir(root.join("val/emu")).unwrap();
        assert_data_error(
            load(&spec, Split::Test, None, &identity()),
            &["val/emu", "no PNG or JPEG"],
        );
        std::fs::write(root.join("val/emu/x.webp"), b"RIFF").unwrap();
        assert_data_error(load(&spec, Split::Test, None, &identity()), &["x.webp", "PNG and JPEG"]);
        std::fs::remove_dir_all(root.join("val")).unwrap();
        assert_data_error(load(&spec, Split::Test, None, &identity()), &["no test folder", "val/"]);
    }

    #[test]
    fn decoding_errors_and_sizes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        save(root, "c/a.png", image::DynamicImage::ImageRgb8(rgb(6, 4, 1)));
        save(root, "c/b.png", image::DynamicImage::ImageRgb8(rgb(4, 4, 1)));
        let spec = root.display().to_string();
        assert_data_error(
            load(&spec, Split::Test, None, &identity()),
            &["b.png is 3x4x4", "a.png is 3x4x6", "--resize"],
        );
        std::fs::write(root.join("c/b.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
        assert_data_error(
            load(&spec, Split::Test, None, &identity()),
            &["c/b.png", "not a readable"],
        );
    }

    #[test]
    fn grey_alpha_and_fitting() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let grey = GrayImage::from_fn(8, 6, |x, _| image::Luma([x as u8 * 10]));
        save(root, "c/a.png", image::DynamicImage::ImageLuma8(grey));
        let rgba = RgbaImage::from_fn(8, 6, |_, _| image::Rgba([5, 6, 7, 0]));
        save(root, "c/b.png", image::DynamicImage::ImageRgba8(rgba));
        let spec = root.display().to_string();
        // Without a model: RGB (grey repeated, alpha dropped).
        let d = load(&spec, Split::Test, None, &identity()).unwrap();
        assert_eq!(d.sample_shape, vec![3, 6, 8]);
        assert_eq!(d.sample(0)[3], 30.0);
        assert_eq!(d.sample(0)[48 + 3], 30.0);
        assert_eq!((d.sample(1)[0], d.sample(1)[48], d.sample(1)[96]), (5.0, 6.0, 7.0));
        // For a grey model: the colour image becomes grey; resize 4 then crop 4x4.
        let fit = Fit {
            shape: Some(vec![1, 4, 4]),
            resize: Some(4),
            center_crop: Some(super::super::CropSize { height: 4, width: 4 }),
            ..Fit::default()
        };
        let (d, notes) = load_fitted(&spec, Split::Test, None, &identity(), &fit).unwrap();
        assert_eq!(d.sample_shape, vec![1, 4, 4]);
        let luma = 0.2126f32 * 5.0 + 0.7152 * 6.0 + 0.0722 * 7.0;
        assert!(d.sample(1).iter().all(|v| (v - luma).abs() < 1e-4), "{:?}", d.sample(1));
        assert_eq!(
            notes,
            [
                format!("1 colour image in {spec} converted to grey (Rec. 709 luma) for the model"),
                format!(
                    "2 images in {spec} fitted by --resize 4 --center-crop 4x4 (triangle filter)"
                )
            ]
        );
    }
}
