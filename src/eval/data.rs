//! Labelled image data sets for the evaluator: Fashion-MNIST as Debian ships it, any directory
//! of IDX files with the Fashion-MNIST names, or a `.npy` array of images with its labels.
//!
//! Nothing is ever downloaded. Every problem with the data (a missing file, a wrong magic
//! number, a truncated file, a label count that differs from the image count, an image size
//! the model does not take) is a [`CompileError::invalid_data`] (exit code 6) whose message
//! names the file at fault.
//!
//! Pixel convention: the evaluator feeds the model `x = (pixel * scale - mean[c]) / std[c]`,
//! where `pixel` is the value as stored (0..255 for IDX and `uint8` files) and `c` the channel.
//! Float `.npy` images are taken as already normalised (fed as stored) unless the user gave
//! normalisation explicitly ([`Normalisation::explicit`]).

use crate::error::CompileError;
use crate::ir::Model;
use anyhow::Result;
use flate2::read::GzDecoder;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` package installs the data set (`--data fashion-mnist`).
pub const DEFAULT_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The spec that names [`DEFAULT_FASHION_MNIST_DIR`].
pub const FASHION_MNIST_SPEC: &str = "fashion-mnist";

/// Model metadata keys (ONNX `metadata_props`) that carry the pixel normalisation the model was
/// trained with, as comma-separated floats.
pub const META_SCALE: &str = "relucompile.scale";
pub const META_MEAN: &str = "relucompile.mean";
pub const META_STD: &str = "relucompile.std";

/// Normalisation when neither the user nor the model says otherwise: raw 8-bit pixels to [0, 1].
pub const DEFAULT_SCALE: f32 = 1.0 / 255.0;

/// Which half of an IDX data set to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `x = (pixel * scale - mean[c]) / std[c]`; `pixel` is the raw value as stored (0..255 for IDX
/// u8). `mean` and `std` hold one value (every channel) or one per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalisation {
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// The user asked for these values (command-line flags). Float `.npy` images are already
    /// normalised and are fed unchanged unless this is set.
    pub explicit: bool,
}

impl Default for Normalisation {
    /// Raw 8-bit pixels to [0, 1]: scale 1/255, mean 0, std 1.
    fn default() -> Self {
        Normalisation { scale: DEFAULT_SCALE, mean: vec![0.0], std: vec![1.0], explicit: false }
    }
}

impl Normalisation {
    /// Values fed unchanged.
    pub fn identity() -> Self {
        Normalisation { scale: 1.0, mean: vec![0.0], std: vec![1.0], explicit: false }
    }

    fn is_identity(&self) -> bool {
        self.scale == 1.0
            && self.mean.iter().all(|&m| m == 0.0)
            && self.std.iter().all(|&s| s == 1.0)
    }

    /// Per-channel mean and std for `channels` channels, after checking every value.
    fn per_channel(&self, channels: usize, source: &str) -> Result<(Vec<f32>, Vec<f32>)> {
        let expand = |what: &str, v: &[f32]| -> Result<Vec<f32>> {
            match v.len() {
                1 => Ok(vec![v[0]; channels]),
                n if n == channels => Ok(v.to_vec()),
                n => Err(CompileError::invalid_data(format!(
                    "the normalisation {what} has {n} values but the images in {source} have \
                     {channels} channel{}: give one value, or one per channel",
                    if channels == 1 { "" } else { "s" }
                ))
                .into()),
            }
        };
        let mean = expand("mean", &self.mean)?;
        let std = expand("std", &self.std)?;
        if !self.scale.is_finite() || mean.iter().any(|m| !m.is_finite()) {
            return Err(CompileError::invalid_data(format!(
                "the normalisation scale {} / mean {:?} must be finite numbers",
                self.scale, self.mean
            ))
            .into());
        }
        if std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(CompileError::invalid_data(format!(
                "the normalisation std {:?} must be finite and non-zero",
                self.std
            ))
            .into());
        }
        Ok((mean, std))
    }

    /// Normalise `values` in place: whole samples of `channels` planes of `plane` values each.
    fn apply(&self, values: &mut [f32], channels: usize, plane: usize, source: &str) -> Result<()> {
        let (mean, std) = self.per_channel(channels, source)?;
        if self.is_identity() {
            return Ok(());
        }
        for sample in values.chunks_mut(channels * plane) {
            for (c, chan) in sample.chunks_mut(plane).enumerate() {
                // Written as the formula reads (not as one fused multiply-add) so that other
                // runtimes given the same formula in float32 see bit-identical inputs.
                for v in chan {
                    *v = (*v * self.scale - mean[c]) / std[c];
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Normalisation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[f32]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(",");
        write!(f, "(pixel * {} - {}) / {}", self.scale, list(&self.mean), list(&self.std))
    }
}

/// Normalisation fields that may each be given or not (flags, model metadata).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartialNormalisation {
    pub scale: Option<f32>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
}

/// The normalisation a model declares in its metadata (`relucompile.scale`, `relucompile.mean`,
/// `relucompile.std`), field by field; a malformed entry is an error naming the key.
pub fn model_normalisation(model: &Model) -> Result<PartialNormalisation> {
    let get = |key: &str| -> Result<Option<Vec<f32>>> {
        let Some(entry) = model.metadata_props.iter().find(|e| e.key == key) else {
            return Ok(None);
        };
        parse_floats(&entry.value).map(Some).map_err(|e| {
            CompileError::invalid_model(format!(
                "the model's metadata entry {key} = '{}' is not a comma-separated list of \
                 numbers: {e}",
                entry.value
            ))
            .into()
        })
    };
    let scale = match get(META_SCALE)? {
        Some(v) if v.len() == 1 => Some(v[0]),
        Some(v) => {
            return Err(CompileError::invalid_model(format!(
                "the model's metadata entry {META_SCALE} holds {} values; it takes one",
                v.len()
            ))
            .into())
        }
        None => None,
    };
    Ok(PartialNormalisation { scale, mean: get(META_MEAN)?, std: get(META_STD)? })
}

/// Parse `0.5` or `0.485,0.456,0.406` (finite numbers, at least one).
pub fn parse_floats(text: &str) -> std::result::Result<Vec<f32>, String> {
    let values: std::result::Result<Vec<f32>, _> =
        text.split(',').map(|v| v.trim().parse::<f32>()).collect();
    match values {
        Ok(v) if !v.is_empty() && v.iter().all(|x| x.is_finite()) => Ok(v),
        _ => Err(format!("'{text}' is not a number or a comma-separated list of numbers")),
    }
}

/// The normalisation to use, field by field: the user's values (flags) first, then the model's
/// metadata, then the default for raw 8-bit pixels (scale 1/255, mean 0, std 1). `explicit`
/// is set when the user gave any of the three.
pub fn try_normalisation_for(
    model: &Model,
    scale: Option<f32>,
    mean: Option<&[f32]>,
    std: Option<&[f32]>,
) -> Result<Normalisation> {
    Ok(resolve(scale, mean, std, model_normalisation(model)?))
}

/// As [`try_normalisation_for`], but a malformed metadata entry is ignored (the defaults apply).
pub fn normalisation_for(
    model: &Model,
    scale: Option<f32>,
    mean: Option<&[f32]>,
    std: Option<&[f32]>,
) -> Normalisation {
    resolve(scale, mean, std, model_normalisation(model).unwrap_or_default())
}

fn resolve(
    scale: Option<f32>,
    mean: Option<&[f32]>,
    std: Option<&[f32]>,
    meta: PartialNormalisation,
) -> Normalisation {
    let default = Normalisation::default();
    Normalisation {
        explicit: scale.is_some() || mean.is_some() || std.is_some(),
        scale: scale.or(meta.scale).unwrap_or(default.scale),
        mean: mean.map(<[f32]>::to_vec).or(meta.mean).unwrap_or(default.mean),
        std: std.map(<[f32]>::to_vec).or(meta.std).unwrap_or(default.std),
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
}

/// Resolve a data spec (`fashion-mnist`, a directory of IDX files, a `.npy` file) without
/// reading any data; fails when it names nothing usable.
pub fn resolve_spec(spec: &str) -> Result<Source> {
    if spec == FASHION_MNIST_SPEC {
        let dir = Path::new(DEFAULT_FASHION_MNIST_DIR);
        if !dir.is_dir() {
            return Err(CompileError::invalid_data(format!(
                "Fashion-MNIST is not installed at {DEFAULT_FASHION_MNIST_DIR} (Debian package \
                 dataset-fashion-mnist); nothing is downloaded: install it, or give --data with \
                 a directory of IDX files or a .npy file"
            ))
            .into());
        }
        return Ok(Source::Idx(dir.to_path_buf()));
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(Source::Idx(path.to_path_buf()));
    }
    let is_npy = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if !path.exists() {
        return Err(CompileError::invalid_data(format!(
            "data set '{spec}' not found: give `{FASHION_MNIST_SPEC}`, a directory of IDX files \
             or a .npy file of images"
        ))
        .into());
    }
    if is_npy {
        return Ok(Source::Npy(path.to_path_buf()));
    }
    Err(CompileError::invalid_data(format!(
        "data set '{spec}' is neither a directory of IDX files nor a .npy file"
    ))
    .into())
}

/// Whether `spec` names float images (a float `.npy` file), which are fed as stored unless the
/// normalisation is [`Normalisation::explicit`]. Reads the `.npy` header only.
pub fn stores_normalised_floats(spec: &str) -> Result<bool> {
    match resolve_spec(spec)? {
        Source::Idx(_) => Ok(false),
        Source::Npy(path) => {
            let npy = open_npy(&path)?;
            Ok(matches!(element_kind(&npy.dtype()), Some(Elem::F32 | Elem::F64)))
        }
    }
}

/// Read a data set: `spec` is `fashion-mnist` ([`DEFAULT_FASHION_MNIST_DIR`]), a directory of
/// IDX files (gzip or plain, Fashion-MNIST names) or a `.npy` file of images (`float32`,
/// `float64` or `uint8`, `[N,H,W]` or `[N,C,H,W]`) with labels in `<stem>_labels.npy` or
/// `labels.npy` beside it. `split` selects the IDX files and is ignored for `.npy`. `limit`
/// keeps the first images only.
pub fn load(
    spec: &str,
    split: Split,
    limit: Option<usize>,
    norm: &Normalisation,
) -> Result<Dataset> {
    if limit == Some(0) {
        return Err(CompileError::invalid_data("--limit 0 selects no images").into());
    }
    match resolve_spec(spec)? {
        Source::Idx(dir) => load_idx_dir(&dir, split, limit, norm),
        Source::Npy(path) => load_npy(&path, limit, norm),
    }
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

// ------------------------------------------------------------------------------------ IDX

/// IDX element types (the third byte of the magic number).
const IDX_U8: u8 = 0x08;
const IDX_I8: u8 = 0x09;
const IDX_I16: u8 = 0x0B;
const IDX_I32: u8 = 0x0C;
const IDX_F32: u8 = 0x0D;
const IDX_F64: u8 = 0x0E;

fn idx_type_size(code: u8) -> Option<usize> {
    match code {
        IDX_U8 | IDX_I8 => Some(1),
        IDX_I16 => Some(2),
        IDX_I32 | IDX_F32 => Some(4),
        IDX_F64 => Some(8),
        _ => None,
    }
}

/// The file for `kind` (`images` or `labels`) of `split` in `dir`: the Fashion-MNIST name,
/// plain or gzip, or the MNIST variant with a dot (`t10k-images.idx3-ubyte`).
fn find_idx_file(dir: &Path, split: Split, kind: &str, ndim: u8) -> Result<PathBuf> {
    let stem = format!("{}-{kind}-idx{ndim}-ubyte", split.prefix());
    let dotted = format!("{}-{kind}.idx{ndim}-ubyte", split.prefix());
    let candidates = [stem.clone(), format!("{stem}.gz"), dotted.clone(), format!("{dotted}.gz")];
    candidates.iter().map(|c| dir.join(c)).find(|p| p.is_file()).ok_or_else(|| {
        CompileError::invalid_data(format!(
            "no {split} {kind} in {}: expected {stem} or {stem}.gz",
            dir.display()
        ))
        .into()
    })
}

/// A reader over the file's contents, decompressing when it starts with the gzip magic.
fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path)
        .map_err(|e| CompileError::invalid_data(format!("cannot open {}: {e}", path.display())))?;
    let mut reader = BufReader::new(file);
    let head = reader
        .fill_buf()
        .map_err(|e| CompileError::invalid_data(format!("cannot read {}: {e}", path.display())))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(BufReader::new(GzDecoder::new(reader))))
    } else {
        Ok(Box::new(reader))
    }
}

/// An IDX file's header and (a prefix of) its values.
struct Idx {
    dims: Vec<usize>,
    type_code: u8,
    /// Raw big-endian bytes of the first `keep` records.
    bytes: Vec<u8>,
}

/// Read an IDX file's header and the first `keep` records (all when `None`), checking the magic
/// number, the number of dimensions, and that the file holds every byte its header promises
/// (and nothing more, when it is read whole).
fn read_idx(path: &Path, what: &str, ndims: &[u8], keep: Option<usize>) -> Result<Idx> {
    let bad = |msg: String| -> anyhow::Error {
        CompileError::invalid_data(format!("{} ({what}): {msg}", path.display())).into()
    };
    let io_err = |e: io::Error| -> anyhow::Error {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            bad("truncated: the file ends inside its header".into())
        } else {
            bad(format!("cannot read it (corrupt gzip?): {e}"))
        }
    };
    let mut reader = open_maybe_gz(path)?;
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic).map_err(io_err)?;
    let expected =
        ndims.iter().map(|n| format!("0x000008{n:02X}")).collect::<Vec<_>>().join(" or ");
    let elem = idx_type_size(magic[2]);
    if magic[0] != 0 || magic[1] != 0 || elem.is_none() || !ndims.contains(&magic[3]) {
        return Err(bad(format!(
            "not an IDX file of {what}: magic number 0x{}, expected {expected}",
            magic.iter().map(|b| format!("{b:02X}")).collect::<String>()
        )));
    }
    let elem = elem.unwrap_or(1);
    let mut dims = Vec::with_capacity(magic[3] as usize);
    for _ in 0..magic[3] {
        let mut d = [0u8; 4];
        reader.read_exact(&mut d).map_err(io_err)?;
        dims.push(u32::from_be_bytes(d) as usize);
    }
    if dims.iter().skip(1).any(|&d| d == 0) {
        return Err(bad(format!("the header declares an empty record size {dims:?}")));
    }
    let record: usize = dims[1..].iter().product::<usize>() * elem;
    let count = keep.map_or(dims[0], |k| k.min(dims[0]));
    let need =
        count.checked_mul(record).ok_or_else(|| bad(format!("absurd dimensions {dims:?}")))?;
    let mut bytes = Vec::with_capacity(need);
    (&mut reader)
        .take(need as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("cannot read it (corrupt gzip?): {e}")))?;
    if bytes.len() < need {
        return Err(bad(format!(
            "truncated: the header declares {} records of {} bytes ({} bytes of data) but \
             the file holds {} bytes of data",
            dims[0],
            record,
            dims[0] * record,
            bytes.len()
        )));
    }
    if count == dims[0] {
        let mut extra = Vec::new();
        reader
            .take(1 << 20)
            .read_to_end(&mut extra)
            .map_err(|e| bad(format!("cannot read it (corrupt gzip?): {e}")))?;
        if !extra.is_empty() {
            return Err(bad(format!(
                "{}{} bytes after the {} records its header declares: not an IDX file of \
                 these dimensions",
                extra.len(),
                if extra.len() == 1 << 20 { "+" } else { "" },
                dims[0]
            )));
        }
    }
    Ok(Idx { dims, type_code: magic[2], bytes })
}

/// Decode big-endian IDX values to f32.
fn idx_values(idx: &Idx) -> Vec<f32> {
    let b = &idx.bytes;
    match idx.type_code {
        IDX_U8 => b.iter().map(|&v| v as f32).collect(),
        IDX_I8 => b.iter().map(|&v| v as i8 as f32).collect(),
        IDX_I16 => b.chunks_exact(2).map(|c| i16::from_be_bytes([c[0], c[1]]) as f32).collect(),
        IDX_I32 => {
            b.chunks_exact(4).map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]) as f32).collect()
        }
        IDX_F32 => {
            b.chunks_exact(4).map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        _ => b
            .chunks_exact(8)
            .map(|c| f64::from_be_bytes(c.try_into().expect("chunks of 8")) as f32)
            .collect(),
    }
}

/// Decode big-endian IDX labels (integer types only).
fn idx_labels(idx: &Idx, path: &Path) -> Result<Vec<u32>> {
    let b = &idx.bytes;
    let values: Vec<i64> = match idx.type_code {
        IDX_U8 => b.iter().map(|&v| v as i64).collect(),
        IDX_I8 => b.iter().map(|&v| v as i8 as i64).collect(),
        IDX_I16 => b.chunks_exact(2).map(|c| i16::from_be_bytes([c[0], c[1]]) as i64).collect(),
        IDX_I32 => {
            b.chunks_exact(4).map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
        }
        code => {
            return Err(CompileError::invalid_data(format!(
                "{} (labels): element type 0x{code:02X} is not an integer type",
                path.display()
            ))
            .into())
        }
    };
    labels_from_ints(values, path)
}

fn labels_from_ints(values: Vec<i64>, path: &Path) -> Result<Vec<u32>> {
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

fn load_idx_dir(
    dir: &Path,
    split: Split,
    limit: Option<usize>,
    norm: &Normalisation,
) -> Result<Dataset> {
    let source = dir.display().to_string();
    let images_path = find_idx_file(dir, split, "images", 3)?;
    let labels_path = find_idx_file(dir, split, "labels", 1)?;
    let labels = read_idx(&labels_path, "labels", &[1], limit)?;
    let images = read_idx(&images_path, "images", &[3, 4], limit)?;
    if images.dims[0] != labels.dims[0] {
        return Err(CompileError::invalid_data(format!(
            "{} holds {} images but {} holds {} labels",
            images_path.display(),
            images.dims[0],
            labels_path.display(),
            labels.dims[0]
        ))
        .into());
    }
    if images.dims[0] == 0 {
        return Err(CompileError::invalid_data(format!(
            "{} holds no images",
            images_path.display()
        ))
        .into());
    }
    let sample_shape: Vec<usize> = match images.dims.len() {
        3 => vec![1, images.dims[1], images.dims[2]],
        _ => images.dims[1..].to_vec(),
    };
    let labels = idx_labels(&labels, &labels_path)?;
    let mut values = idx_values(&images);
    let per_channel = sample_shape[1] * sample_shape[2];
    norm.apply(&mut values, sample_shape[0], per_channel, &source)?;
    Ok(Dataset { images: values, labels, sample_shape, source })
}

// ------------------------------------------------------------------------------------ npy

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F64,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
}

fn element_kind(dtype: &npyz::DType) -> Option<Elem> {
    use npyz::TypeChar;
    let npyz::DType::Plain(ts) = dtype else { return None };
    Some(match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 4) => Elem::F32,
        (TypeChar::Float, 8) => Elem::F64,
        (TypeChar::Uint, 1) => Elem::U8,
        (TypeChar::Uint, 2) => Elem::U16,
        (TypeChar::Uint, 4) => Elem::U32,
        (TypeChar::Uint, 8) => Elem::U64,
        (TypeChar::Int, 1) => Elem::I8,
        (TypeChar::Int, 2) => Elem::I16,
        (TypeChar::Int, 4) => Elem::I32,
        (TypeChar::Int, 8) => Elem::I64,
        _ => return None,
    })
}

type NpyIn = npyz::NpyFile<BufReader<File>>;

fn open_npy(path: &Path) -> Result<NpyIn> {
    let file = File::open(path)
        .map_err(|e| CompileError::invalid_data(format!("cannot open {}: {e}", path.display())))?;
    let npy = npyz::NpyFile::new(BufReader::new(file)).map_err(|e| {
        CompileError::invalid_data(format!("{} is not a .npy file: {e}", path.display()))
    })?;
    if npy.order() != npyz::Order::C && npy.shape().len() > 1 {
        return Err(CompileError::invalid_data(format!(
            "{} is stored in Fortran order; save it with numpy.ascontiguousarray",
            path.display()
        ))
        .into());
    }
    Ok(npy)
}

/// Read the first `count` elements as `T`, converted by `conv`.
fn npy_take<T: npyz::Deserialize, U>(
    npy: NpyIn,
    count: usize,
    path: &Path,
    conv: impl Fn(T) -> U,
) -> Result<Vec<U>> {
    let reader = npy.data::<T>().map_err(|e| {
        CompileError::invalid_data(format!("{}: unreadable dtype: {e}", path.display()))
    })?;
    let mut out = Vec::with_capacity(count);
    for v in reader.take(count) {
        let v = v.map_err(|e| {
            CompileError::invalid_data(format!(
                "{} is truncated or unreadable after {} values (the header declares more): {e}",
                path.display(),
                out.len()
            ))
        })?;
        out.push(conv(v));
    }
    Ok(out)
}

fn npy_values(npy: NpyIn, kind: Elem, count: usize, path: &Path) -> Result<Vec<f32>> {
    match kind {
        Elem::F32 => npy_take(npy, count, path, |v: f32| v),
        Elem::F64 => npy_take(npy, count, path, |v: f64| v as f32),
        Elem::U8 => npy_take(npy, count, path, |v: u8| v as f32),
        _ => Err(CompileError::invalid_data(format!(
            "{} holds {}: images must be float32, float64 or uint8",
            path.display(),
            npy.dtype().descr()
        ))
        .into()),
    }
}

fn npy_labels(npy: NpyIn, kind: Option<Elem>, count: usize, path: &Path) -> Result<Vec<u32>> {
    let values: Vec<i64> = match kind {
        Some(Elem::I64) => npy_take(npy, count, path, |v: i64| v)?,
        Some(Elem::I32) => npy_take(npy, count, path, |v: i32| v as i64)?,
        Some(Elem::I16) => npy_take(npy, count, path, |v: i16| v as i64)?,
        Some(Elem::I8) => npy_take(npy, count, path, |v: i8| v as i64)?,
        Some(Elem::U8) => npy_take(npy, count, path, |v: u8| v as i64)?,
        Some(Elem::U16) => npy_take(npy, count, path, |v: u16| v as i64)?,
        Some(Elem::U32) => npy_take(npy, count, path, |v: u32| v as i64)?,
        Some(Elem::U64) => npy_take(npy, count, path, |v: u64| i64::try_from(v).unwrap_or(-1))?,
        _ => {
            return Err(CompileError::invalid_data(format!(
                "{} holds {}: labels must be integers (int64, int32 or uint8)",
                path.display(),
                npy.dtype().descr()
            ))
            .into())
        }
    };
    labels_from_ints(values, path)
}

/// `<stem>_labels.npy`, else `labels.npy`, beside the images.
fn npy_labels_path(images: &Path) -> Result<PathBuf> {
    let dir = images.parent().unwrap_or(Path::new(""));
    let stem = images.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let sibling = dir.join(format!("{stem}_labels.npy"));
    let shared = dir.join("labels.npy");
    if sibling.is_file() {
        return Ok(sibling);
    }
    if shared.is_file() {
        return Ok(shared);
    }
    Err(CompileError::invalid_data(format!(
        "no labels for {}: expected {} or {}",
        images.display(),
        sibling.display(),
        shared.display()
    ))
    .into())
}

fn load_npy(path: &Path, limit: Option<usize>, norm: &Normalisation) -> Result<Dataset> {
    let source = path.display().to_string();
    let labels_path = npy_labels_path(path)?;
    let images = open_npy(path)?;
    let shape: Vec<usize> = images.shape().iter().map(|&d| d as usize).collect();
    let sample_shape = match shape.len() {
        3 => vec![1, shape[1], shape[2]],
        4 => shape[1..].to_vec(),
        _ => {
            return Err(CompileError::invalid_data(format!(
                "{} has shape {shape:?}: images must be [N,H,W] or [N,C,H,W]",
                path.display()
            ))
            .into())
        }
    };
    if sample_shape.contains(&0) || shape[0] == 0 {
        return Err(CompileError::invalid_data(format!(
            "{} has shape {shape:?}: it holds no image data",
            path.display()
        ))
        .into());
    }
    let labels = open_npy(&labels_path)?;
    let label_shape: Vec<usize> = labels.shape().iter().map(|&d| d as usize).collect();
    if label_shape.len() != 1 {
        return Err(CompileError::invalid_data(format!(
            "{} has shape {label_shape:?}: labels must be one-dimensional [N]",
            labels_path.display()
        ))
        .into());
    }
    if label_shape[0] != shape[0] {
        return Err(CompileError::invalid_data(format!(
            "{} holds {} images but {} holds {} labels",
            path.display(),
            shape[0],
            labels_path.display(),
            label_shape[0]
        ))
        .into());
    }
    let n = limit.map_or(shape[0], |l| l.min(shape[0]));
    let per: usize = sample_shape.iter().product();
    let kind = element_kind(&images.dtype());
    let is_float = matches!(kind, Some(Elem::F32 | Elem::F64));
    let mut values = match kind {
        Some(k) => npy_values(images, k, n * per, path)?,
        None => {
            return Err(CompileError::invalid_data(format!(
                "{} holds {}: images must be float32, float64 or uint8",
                path.display(),
                images.dtype().descr()
            ))
            .into())
        }
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(CompileError::invalid_data(format!(
            "{}: image {} holds a non-finite value ({})",
            path.display(),
            i / per,
            values[i]
        ))
        .into());
    }
    let label_kind = element_kind(&labels.dtype());
    let labels = npy_labels(labels, label_kind, n, &labels_path)?;
    if !is_float || norm.explicit {
        norm.apply(&mut values, sample_shape[0], sample_shape[1] * sample_shape[2], &source)?;
    }
    Ok(Dataset { images: values, labels, sample_shape, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{exit_code_of, ExitCode};
    use npyz::WriterBuilder;
    use std::io::Write;

    fn idx_bytes(type_code: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, type_code, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    fn write(path: &Path, bytes: &[u8], gz: bool) {
        let mut f = File::create(path).unwrap();
        if gz {
            let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            enc.write_all(bytes).unwrap();
            enc.finish().unwrap();
        } else {
            f.write_all(bytes).unwrap();
        }
    }

    /// `n` images of `h`x`w` whose pixel j of image i is `(i + j) % 256`, labels `i % 10`.
    fn idx_dir(n: u32, h: u32, w: u32, gz: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> =
            (0..n * h * w).map(|k| ((k / (h * w) + k % (h * w)) % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let ext = if gz { ".gz" } else { "" };
        for prefix in ["t10k", "train"] {
            write(
                &dir.path().join(format!("{prefix}-images-idx3-ubyte{ext}")),
                &idx_bytes(0x08, &[n, h, w], &pixels),
                gz,
            );
            write(
                &dir.path().join(format!("{prefix}-labels-idx1-ubyte{ext}")),
                &idx_bytes(0x08, &[n], &labels),
                gz,
            );
        }
        dir
    }

    fn spec(dir: &tempfile::TempDir) -> String {
        dir.path().display().to_string()
    }

    fn err_of(r: Result<Dataset>) -> anyhow::Error {
        match r {
            Ok(d) => panic!("expected an error, loaded {} images", d.len()),
            Err(e) => e,
        }
    }

    fn assert_data_error(r: Result<Dataset>, needles: &[&str]) {
        let e = err_of(r);
        assert_eq!(exit_code_of(&e), ExitCode::InvalidData, "{e:#}");
        let msg = format!("{e:#}");
        for n in needles {
            assert!(msg.contains(n), "'{msg}' should mention '{n}'");
        }
    }

    #[test]
    fn reads_idx_plain_and_gzip() {
        for gz in [false, true] {
            let dir = idx_dir(5, 4, 3, gz);
            let d = load(&spec(&dir), Split::Test, None, &Normalisation::identity()).unwrap();
            assert_eq!(d.len(), 5);
            assert_eq!(d.sample_shape, vec![1, 4, 3]);
            assert_eq!(d.labels, vec![0, 1, 2, 3, 4]);
            assert_eq!(d.sample(2)[0], 2.0);
            assert_eq!(d.sample(2)[11], 13.0);
            assert_eq!(d.source, spec(&dir));
        }
    }

    #[test]
    fn normalises_and_limits() {
        let dir = idx_dir(5, 2, 2, true);
        let norm =
            Normalisation { scale: 1.0 / 255.0, mean: vec![0.5], std: vec![0.25], explicit: true };
        let d = load(&spec(&dir), Split::Train, Some(3), &norm).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.images.len(), 12);
        let want = (3.0f32 * (1.0 / 255.0) - 0.5) / 0.25; // image 1, pixel 2 is 3
        assert_eq!(d.sample(1)[2], want);
        let sub = d.subset(1..3);
        assert_eq!(sub.len(), 2);
        assert_eq!(sub.sample(0), d.sample(1));
        assert_eq!(sub.labels, vec![1, 2]);
        // A limit above the count reads everything.
        assert_eq!(load(&spec(&dir), Split::Test, Some(99), &norm).unwrap().len(), 5);
        // Wrong number of channel means.
        let bad = Normalisation { mean: vec![0.1, 0.2, 0.3], ..norm };
        assert_data_error(load(&spec(&dir), Split::Test, None, &bad), &["mean", "3 values"]);
    }

    #[test]
    fn wrong_magic_is_named() {
        let dir = idx_dir(3, 2, 2, false);
        let path = dir.path().join("t10k-images-idx3-ubyte");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] = 0x01; // labels' magic
        std::fs::write(&path, &bytes).unwrap();
        assert_data_error(
            load(&spec(&dir), Split::Test, None, &Normalisation::default()),
            &["t10k-images-idx3-ubyte", "magic number 0x00000801"],
        );
        std::fs::write(&path, b"PK\x03\x04 not idx at all").unwrap();
        assert_data_error(
            load(&spec(&dir), Split::Test, None, &Normalisation::default()),
            &["t10k-images-idx3-ubyte", "not an IDX file"],
        );
    }

    #[test]
    fn truncated_files_are_named() {
        let dir = idx_dir(4, 3, 3, true);
        let path = dir.path().join("t10k-images-idx3-ubyte.gz");
        let pixels = vec![7u8; 4 * 9 - 5];
        write(&path, &idx_bytes(0x08, &[4, 3, 3], &pixels), true);
        assert_data_error(
            load(&spec(&dir), Split::Test, None, &Normalisation::default()),
            &["t10k-images-idx3-ubyte.gz", "truncated", "31 bytes"],
        );
        // A header cut short.
        write(&path, &[0, 0, 8, 3, 0, 0], true);
        assert_data_error(
            load(&spec(&dir), Split::Test, None, &Normalisation::default()),
            &["t10k-images-idx3-ubyte.gz", "truncated"],
        );
        // A gzip stream cut short.
        let mut gz = Vec::new();
        {
            let mut enc = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
            enc.write_all(&idx_bytes(0x08, &[4, 3, 3], &[1u8; 36])).unwrap();
        }
        std::fs::write(&path, &gz[..gz.len() / 2]).unwrap();
        let e = err_of(load(&spec(&dir), Split::Test, None, &Normalisation::default()));
        assert_eq!(exit_code_of(&e), ExitCode::InvalidData);
        assert!(format!("{e:#}").contains("t10k-images-idx3-ubyte.gz"), "{e:#}");
        // Trailing bytes: the header does not describe the file.
        write(&path, &idx_bytes(0x08, &[4, 3, 3], &[1u8; 40]), true);
        assert_data_error(
            load(&spec(&dir), Split::Test, None, &Normalisation::default()),
            &["t10k-images-idx3-ubyte.gz", "4 bytes after"],
        );
    }

    #[test]
    fn count_mismatch_names_both_files() {
        let dir = idx_dir(4, 2, 2, false);
        write(
            &dir.path().join("t10k-labels-idx1-ubyte"),
            &idx_bytes(0x08, &[3], &[0, 1, 2]),
            false,
        );
        assert_data_error(
            load(&spec(&dir), Split::Test, Some(2), &Normalisation::default()),
            &["t10k-images-idx3-ubyte", "4 images", "t10k-labels-idx1-ubyte", "3 labels"],
        );
    }

    #[test]
    fn missing_files_and_dirs() {
        let dir = idx_dir(2, 2, 2, false);
        std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte")).unwrap();
        assert_data_error(
            load(&spec(&dir), Split::Train, None, &Normalisation::default()),
            &["train labels", "train-labels-idx1-ubyte"],
        );
        let missing = dir.path().join("nope");
        assert_data_error(
            load(&missing.display().to_string(), Split::Test, None, &Normalisation::default()),
            &["nope", "not found"],
        );
        assert_data_error(
            load(&spec(&dir), Split::Test, Some(0), &Normalisation::default()),
            &["--limit 0"],
        );
    }

    #[test]
    fn check_fits_names_shapes() {
        let dir = idx_dir(2, 32, 32, false);
        let d = load(&spec(&dir), Split::Test, None, &Normalisation::default()).unwrap();
        check_fits(&d, &[1, 32, 32]).unwrap();
        let e = check_fits_named(&d, &[1, 28, 28], "model.onnx").unwrap_err();
        assert_eq!(exit_code_of(&e), ExitCode::InvalidData);
        assert_eq!(
            e.to_string(),
            format!("images in {} are 1x32x32 but model.onnx expects 1x28x28", spec(&dir))
        );
    }

    fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) {
        let f = File::create(path).unwrap();
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .writer(io::BufWriter::new(f))
            .begin_nd()
            .unwrap();
        w.extend(data.iter().copied()).unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn reads_npy_float_and_u8() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = dir.path().join("x.npy");
        let data: Vec<f32> = (0..2 * 3 * 2 * 2).map(|v| v as f32).collect();
        write_npy(&imgs, &[2, 3, 2, 2], &data);
        write_npy(&dir.path().join("x_labels.npy"), &[2], &[7i64, 3]);
        let p = imgs.display().to_string();
        assert!(stores_normalised_floats(&p).unwrap());
        // Float images are fed as stored unless the normalisation is explicit.
        let d = load(&p, Split::Test, None, &Normalisation::default()).unwrap();
        assert_eq!(d.sample_shape, vec![3, 2, 2]);
        assert_eq!(d.images, data);
        assert_eq!(d.labels, vec![7, 3]);
        let norm = Normalisation {
            scale: 2.0,
            mean: vec![0.0, 1.0, 2.0],
            std: vec![1.0, 2.0, 4.0],
            explicit: true,
        };
        let d = load(&p, Split::Test, Some(1), &norm).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d.images[4], (4.0 * 2.0 - 1.0) / 2.0);
        assert_eq!(d.images[8], (8.0 * 2.0 - 2.0) / 4.0);

        // uint8 [N,H,W] with a shared labels.npy (int32): raw pixels, normalised.
        let imgs = dir.path().join("u.npy");
        write_npy(&imgs, &[3, 2, 2], &[255u8; 12]);
        write_npy(&dir.path().join("labels.npy"), &[3], &[1i32, 2, 3]);
        let p = imgs.display().to_string();
        assert!(!stores_normalised_floats(&p).unwrap());
        let d = load(&p, Split::Test, None, &Normalisation::default()).unwrap();
        assert_eq!(d.sample_shape, vec![1, 2, 2]);
        assert!(d.images.iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert_eq!(d.labels, vec![1, 2, 3]);
    }

    #[test]
    fn npy_errors_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = dir.path().join("x.npy");
        write_npy(&imgs, &[2, 2, 2], &[0.5f32; 8]);
        let p = imgs.display().to_string();
        assert_data_error(
            load(&p, Split::Test, None, &Normalisation::default()),
            &["no labels", "x_labels.npy", "labels.npy"],
        );
        let labels = dir.path().join("x_labels.npy");
        write_npy(&labels, &[3], &[0u8, 1, 2]);
        assert_data_error(
            load(&p, Split::Test, None, &Normalisation::default()),
            &["x.npy", "2 images", "x_labels.npy", "3 labels"],
        );
        write_npy(&labels, &[2], &[0.0f32, 1.0]);
        assert_data_error(
            load(&p, Split::Test, None, &Normalisation::default()),
            &["x_labels.npy", "integers"],
        );
        write_npy(&labels, &[2], &[0i64, -1]);
        assert_data_error(
            load(&p, Split::Test, None, &Normalisation::default()),
            &["x_labels.npy", "-1"],
        );
        write_npy(&labels, &[2], &[0i64, 1]);
        // Truncated image data.
        let bytes = std::fs::read(&imgs).unwrap();
        std::fs::write(&imgs, &bytes[..bytes.len() - 6]).unwrap();
        assert_data_error(
            load(&p, Split::Test, None, &Normalisation::default()),
            &["x.npy", "truncated"],
        );
        // Not a .npy file.
        std::fs::write(&imgs, b"hello").unwrap();
        assert_data_error(
            load(&p, Split::Test, None, &Normalisation::default()),
            &["x.npy", "not a .npy"],
        );
        // A wrong rank and a wrong dtype.
        write_npy(&imgs, &[2, 4], &[0.5f32; 8]);
        assert_data_error(
            load(&p, Split::Test, None, &Normalisation::default()),
            &["x.npy", "[N,H,W]"],
        );
        write_npy(&imgs, &[2, 2, 2], &[1i16; 8]);
        assert_data_error(
            load(&p, Split::Test, None, &Normalisation::default()),
            &["x.npy", "float32"],
        );
    }

    #[test]
    fn normalisation_precedence() {
        let mut model = crate::frontend::model_from_bytes(
            &std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fixtures/models/tiny_ts_opset13.onnx"
            ))
            .unwrap(),
            None,
        )
        .unwrap();
        model.metadata_props.retain(|e| !e.key.starts_with("relucompile."));
        let n = try_normalisation_for(&model, None, None, None).unwrap();
        assert_eq!(n, Normalisation::default());
        let entry = |k: &str, v: &str| tract_onnx::pb::StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        };
        model.metadata_props.push(entry(META_SCALE, "0.00392156862745098"));
        model.metadata_props.push(entry(META_MEAN, "0.2860"));
        model.metadata_props.push(entry(META_STD, "0.3530"));
        let n = try_normalisation_for(&model, None, None, None).unwrap();
        assert_eq!(
            (n.scale, n.mean.clone(), n.std.clone(), n.explicit),
            (1.0 / 255.0, vec![0.286], vec![0.353], false)
        );
        let n = try_normalisation_for(&model, None, Some(&[0.5]), None).unwrap();
        assert_eq!(
            (n.scale, n.mean.clone(), n.std.clone(), n.explicit),
            (1.0 / 255.0, vec![0.5], vec![0.353], true)
        );
        model.metadata_props.push(entry(META_STD, "x"));
        model.metadata_props.retain(|e| e.key != META_STD || e.value == "x");
        let e = try_normalisation_for(&model, None, None, None).unwrap_err();
        assert!(format!("{e:#}").contains(META_STD), "{e:#}");
        assert_eq!(normalisation_for(&model, None, None, None), Normalisation::default());
        assert_eq!(parse_floats("0.1, 0.2,0.3").unwrap(), vec![0.1, 0.2, 0.3]);
        assert!(parse_floats("0.1,,0.3").is_err());
        assert!(parse_floats("nan").is_err());
    }
}
