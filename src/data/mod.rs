//! Labelled image data sets for evaluation, calibration and training, one format per file:
//! - [`idx`]: IDX files with the Fashion-MNIST names (`fashion-mnist` names Debian's copy);
//! - [`npy`]: a `.npy` array of images with its labels;
//! - [`image_folder`]: a torchvision `ImageFolder` tree of PNG and JPEG files;
//! - [`cifar`]: the CIFAR-10 and CIFAR-100 binary files;
//! - [`fit`]: resizing, centre-cropping and channel conversion to the model's input;
//! - [`normalise`]: `x = (pixel * scale - mean[c]) / std[c]`.
//!
//! Nothing is ever downloaded. Every problem with the data (a missing file, a wrong magic
//! number, a truncated file, a label count that differs from the image count, an image size
//! the model does not take) is a [`CompileError::invalid_data`] (exit code 6) whose message
//! names the file at fault.
//!
//! Pixel convention: the evaluator feeds the model `x = (pixel * scale - mean[c]) / std[c]`,
//! where `pixel` is the value as stored (0..255 for IDX, CIFAR, PNG, JPEG and `uint8` files)
//! and `c` the channel. Float `.npy` images are taken as already normalised (fed as stored)
//! unless the user gave normalisation explicitly ([`Normalisation::explicit`]).

pub mod cifar;
pub mod fit;
pub mod idx;
pub mod image_folder;
pub mod normalise;
pub mod npy;
mod random;

pub use cifar::Cifar;
pub use fit::{CropSize, Fit};
pub use normalise::{
    model_normalisation, normalisation_for, parse_floats, try_normalisation_for, Normalisation,
    NormalisationSource, PartialNormalisation, DEFAULT_SCALE, META_MEAN, META_SCALE, META_STD,
};
pub use random::random_inputs;

use crate::error::{CompileError, ExitCode};
use anyhow::Result;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` package installs the data set (`--data fashion-mnist`).
pub const DEFAULT_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The spec that names [`DEFAULT_FASHION_MNIST_DIR`].
pub const FASHION_MNIST_SPEC: &str = "fashion-mnist";

/// The formats `--data` takes, for messages.
pub const FORMATS: &str = "`fashion-mnist`, a directory of IDX files, CIFAR-10/100 binaries or \
    class folders of PNG/JPEG images (an image-folder tree), or a .npy file";

/// Which half of a data set to read (`test` also selects an image folder's `val/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    /// The Fashion-MNIST (and MNIST) file-name prefix of the split.
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Split::Train, Split::Test]
            .into_iter()
            .find(|split| split.name() == s)
            .ok_or_else(|| format!("split '{s}' is not one of: train, test"))
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Labelled images, normalised and ready to feed a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Normalised, row-major `N*C*H*W`.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    /// One sample's shape, `[C, H, W]`.
    pub sample_shape: Vec<usize>,
    /// Where the data came from (a directory or a `.npy` file), for messages and reports.
    pub source: String,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per sample (`C*H*W`).
    pub fn sample_len(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// Sample `i`'s normalised values.
    pub fn sample(&self, i: usize) -> &[f32] {
        let per = self.sample_len();
        &self.images[i * per..(i + 1) * per]
    }

    /// The samples at `indices`, in that order, as a data set of their own.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        Dataset {
            images: indices.iter().flat_map(|&i| self.sample(i).iter().copied()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            sample_shape: self.sample_shape.clone(),
            source: self.source.clone(),
        }
    }

    /// `count` samples drawn without replacement by a seeded shuffle: the same seed gives the
    /// same subset on every machine.
    pub fn seeded_subset(&self, count: usize, seed: u64) -> Dataset {
        let mut order: Vec<usize> = (0..self.len()).collect();
        let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
        for i in (1..order.len()).rev() {
            // splitmix64 step
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            order.swap(i, (z % (i as u64 + 1)) as usize);
        }
        order.truncate(count.min(self.len()));
        self.select(&order)
    }

    /// Samples `range` as a data set of their own (same shape and source).
    pub fn subset(&self, range: Range<usize>) -> Dataset {
        let per = self.sample_len();
        Dataset {
            images: self.images[range.start * per..range.end * per].to_vec(),
            labels: self.labels[range].to_vec(),
            sample_shape: self.sample_shape.clone(),
            source: self.source.clone(),
        }
    }
}

/// `1x28x28`.
pub fn shape_text(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

/// What a data spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory of IDX files with the Fashion-MNIST names.
    Idx(PathBuf),
    /// A `.npy` file of images (labels beside it).
    Npy(PathBuf),
    /// A torchvision `ImageFolder` tree.
    ImageFolder(PathBuf),
    /// A directory of CIFAR-10 or CIFAR-100 binary files.
    Cifar(Cifar, PathBuf),
}

impl Source {
    /// Whether the data has a training and a test split (a `.npy` file and an image folder
    /// without `train/` and `test/` are one set).
    pub fn has_splits(&self) -> bool {
        match self {
            Source::Idx(_) | Source::Cifar(..) => true,
            Source::Npy(_) => false,
            Source::ImageFolder(root) => image_folder::has_splits(root),
        }
    }

    /// The format's name, for reports: `IDX`, `npy`, `image folder`, `CIFAR-10`, `CIFAR-100`.
    pub fn format(&self) -> &'static str {
        match self {
            Source::Idx(_) => "IDX",
            Source::Npy(_) => "npy",
            Source::ImageFolder(_) => "image folder",
            Source::Cifar(kind, _) => kind.name(),
        }
    }
}

/// Resolve a data spec (see [`FORMATS`]) without reading any data; fails when it names nothing
/// usable. A directory is taken as IDX when it holds IDX files, CIFAR when it holds CIFAR
/// binaries (or the tarballs' `cifar-10-batches-bin` / `cifar-100-binary` folder), and as an
/// image-folder tree when it holds folders.
pub fn resolve_spec(spec: &str) -> Result<Source> {
    if spec == FASHION_MNIST_SPEC {
        let dir = Path::new(DEFAULT_FASHION_MNIST_DIR);
        if !dir.is_dir() {
            return Err(CompileError::invalid_data(format!(
                "Fashion-MNIST is not installed at {DEFAULT_FASHION_MNIST_DIR} (Debian package \
                 dataset-fashion-mnist); nothing is downloaded: install it, or give --data with \
                 {FORMATS}"
            ))
            .into());
        }
        return Ok(Source::Idx(dir.to_path_buf()));
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return resolve_dir(path);
    }
    if !path.exists() {
        return Err(CompileError::invalid_data(format!(
            "data set '{spec}' not found: give {FORMATS}"
        ))
        .into());
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")) {
        return Ok(Source::Npy(path.to_path_buf()));
    }
    Err(CompileError::invalid_data(format!(
        "data set '{spec}' is a file but not a .npy file: give {FORMATS}"
    ))
    .into())
}

fn resolve_dir(dir: &Path) -> Result<Source> {
    if idx::holds_idx(dir) {
        return Ok(Source::Idx(dir.to_path_buf()));
    }
    if let Some(kind) = Cifar::detect(dir) {
        return Ok(Source::Cifar(kind, dir.to_path_buf()));
    }
    for inner in ["cifar-10-batches-bin", "cifar-100-binary"] {
        let d = dir.join(inner);
        if let Some(kind) = Cifar::detect(&d) {
            return Ok(Source::Cifar(kind, d));
        }
    }
    if image_folder::holds_folders(dir) {
        return Ok(Source::ImageFolder(dir.to_path_buf()));
    }
    Err(CompileError::invalid_data(format!(
        "{} holds no data set relucompile reads: expected IDX files ({}-images-idx3-ubyte[.gz] \
         and the like), CIFAR binaries (data_batch_1.bin .. test_batch.bin, or train.bin and \
         test.bin), or class folders of PNG/JPEG images",
        dir.display(),
        Split::Test.prefix()
    ))
    .into())
}

/// Whether `spec` names float images (a float `.npy` file), which are fed as stored unless the
/// normalisation is [`Normalisation::explicit`]. Reads the `.npy` header only.
pub fn stores_normalised_floats(spec: &str) -> Result<bool> {
    match resolve_spec(spec)? {
        Source::Npy(path) => npy::stores_floats(&path),
        _ => Ok(false),
    }
}

/// Images as a reader hands them over: values as stored, before fitting and normalisation.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    /// Row-major `N*C*H*W`.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    /// `[C, H, W]`.
    pub sample_shape: Vec<usize>,
    pub source: String,
    /// Float values saved already normalised (a float `.npy`).
    pub normalised: bool,
}

/// Read a data set in its own shape (no fitting): `spec` as [`resolve_spec`] takes it.
/// `split` is ignored by sets without splits. `limit` keeps the first images only.
pub fn load(
    spec: &str,
    split: Split,
    limit: Option<usize>,
    norm: &Normalisation,
) -> Result<Dataset> {
    load_fitted(spec, split, limit, norm, &Fit::default()).map(|(data, _)| data)
}

/// Read a data set fitted to a model ([`Fit`]), then normalised: the data set and notes for
/// people on what was converted (grey to colour, resized).
pub fn load_fitted(
    spec: &str,
    split: Split,
    limit: Option<usize>,
    norm: &Normalisation,
    fit: &Fit,
) -> Result<(Dataset, Vec<String>)> {
    if limit == Some(0) {
        return Err(CompileError::invalid_data("--limit 0 selects no images").into());
    }
    let source = resolve_spec(spec)?;
    if fit.coarse_labels && !matches!(source, Source::Cifar(Cifar::Hundred, _)) {
        return Err(CompileError::new(
            ExitCode::Usage,
            format!(
                "--coarse-labels picks CIFAR-100's coarse labels, but {spec} is {} data",
                source.format()
            ),
        )
        .into());
    }
    let (stored, notes) = match &source {
        Source::ImageFolder(root) => image_folder::load(root, split, limit, fit)?,
        Source::Idx(dir) => fit.samples(idx::load(dir, split, limit)?)?,
        Source::Npy(path) => fit.samples(npy::load(path, limit)?)?,
        Source::Cifar(kind, dir) => {
            fit.samples(cifar::load(dir, *kind, split, limit, fit.coarse_labels)?)?
        }
    };
    let Stored { mut images, labels, sample_shape, source, normalised } = stored;
    if !normalised || norm.explicit() {
        norm.apply(&mut images, sample_shape[0], sample_shape[1] * sample_shape[2], &source)?;
    }
    Ok((Dataset { images, labels, sample_shape, source }, notes))
}

/// Error unless the data's samples have the shape the model takes; the message names the data
/// source and both shapes.
pub fn check_fits(data: &Dataset, model_sample_shape: &[usize]) -> Result<()> {
    check_fits_named(data, model_sample_shape, "the model")
}

/// [`check_fits`] with the model named in the message (`model.onnx expects 1x28x28`).
pub fn check_fits_named(data: &Dataset, model_sample_shape: &[usize], model: &str) -> Result<()> {
    if data.sample_shape == model_sample_shape {
        return Ok(());
    }
    Err(CompileError::invalid_data(format!(
        "images in {} are {} but {model} expects {}",
        data.source,
        shape_text(&data.sample_shape),
        shape_text(model_sample_shape)
    ))
    .into())
}

/// `images holds N images but labels holds M labels`.
pub(super) fn count_mismatch(images: &Path, n: usize, labels: &Path, m: usize) -> anyhow::Error {
    CompileError::invalid_data(format!(
        "{} holds {n} images but {} holds {m} labels",
        images.display(),
        labels.display()
    ))
    .into()
}

pub(super) fn labels_from_ints(values: Vec<i64>, path: &Path) -> Result<Vec<u32>> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            u32::try_from(v).map_err(|_| {
                CompileError::invalid_data(format!(
                    "{} (labels): label {v} at index {i} is not a class index",
                    path.display()
                ))
                .into()
            })
        })
        .collect()
}

#[cfg(test)]
pub(super) mod test_util {
    use super::Dataset;
    use crate::error::{exit_code_of, ExitCode};
    use anyhow::Result;
    use npyz::WriterBuilder;
    use std::path::Path;

    pub fn err_of(r: Result<Dataset>) -> anyhow::Error {
        match r {
            Ok(d) => panic!("expected an error, loaded {} images", d.len()),
            Err(e) => e,
        }
    }

    pub fn assert_data_error(r: Result<Dataset>, needles: &[&str]) {
        let e = err_of(r);
        assert_eq!(exit_code_of(&e), ExitCode::InvalidData, "{e:#}");
        let msg = format!("{e:#}");
        for n in needles {
            assert!(msg.contains(n), "'{msg}' should mention '{n}'");
        }
    }

    pub fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) {
        let f = std::fs::File::create(path).unwrap();
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .writer(std::io::BufWriter::new(f))
            .begin_nd()
            .unwrap();
        w.extend(data.iter().copied()).unwrap();
        w.finish().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A search draws its calibration images and, after them, its probes' training images from
    /// one seeded order: a longer draw must extend the shorter one, so the two never overlap.
    #[test]
    fn a_longer_seeded_draw_extends_the_shorter_one() {
        let d = Dataset {
            images: (0..50).map(|v| v as f32).collect(),
            labels: (0..50).collect(),
            sample_shape: vec![1, 1, 1],
            source: "numbers".into(),
        };
        let (short, long) = (d.seeded_subset(20, 3), d.seeded_subset(35, 3));
        assert_eq!(long.subset(0..20), short);
        assert_ne!(short.labels, (0..20).collect::<Vec<_>>(), "not shuffled");
        let mut all = long.labels.clone();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 35, "drawn without replacement");
    }

    #[test]
    fn check_fits_names_shapes() {
        let d = Dataset {
            images: vec![0.0; 2 * 32 * 32],
            labels: vec![0, 1],
            sample_shape: vec![1, 32, 32],
            source: "dir".into(),
        };
        check_fits(&d, &[1, 32, 32]).unwrap();
        let e = check_fits_named(&d, &[1, 28, 28], "model.onnx").unwrap_err();
        assert_eq!(crate::error::exit_code_of(&e), ExitCode::InvalidData);
        assert_eq!(e.to_string(), "images in dir are 1x32x32 but model.onnx expects 1x28x28");
    }

    #[test]
    fn directories_resolve_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().display().to_string();
        let e = resolve_spec(&spec).unwrap_err();
        assert_eq!(crate::error::exit_code_of(&e), ExitCode::InvalidData);
        for needle in ["holds no data set", "t10k-images-idx3-ubyte", "test_batch.bin", "PNG/JPEG"]
        {
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
        std::fs::write(dir.path().join("x.txt"), "").unwrap();
        let e = resolve_spec(&dir.path().join("x.txt").display().to_string()).unwrap_err();
        assert!(e.to_string().contains("not a .npy file"), "{e}");
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte.gz"), "").unwrap();
        assert_eq!(resolve_spec(&spec).unwrap(), Source::Idx(dir.path().into()));
        assert_eq!(resolve_spec(&spec).unwrap().format(), "IDX");
    }
}
