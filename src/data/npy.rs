//! A `.npy` file of images (`float32`, `float64` or `uint8`; `[N,H,W]` or `[N,C,H,W]`) with
//! integer labels in `<stem>_labels.npy` or `labels.npy` beside it. Float images are taken as
//! already normalised (see [`super::Normalisation::explicit`]).

use super::{count_mismatch, labels_from_ints, Stored};
use crate::error::CompileError;
use anyhow::Result;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Whether the `.npy` file at `path` holds float images (reads the header only).
pub(super) fn stores_floats(path: &Path) -> Result<bool> {
    let npy = open_npy(path)?;
    Ok(matches!(element_kind(&npy.dtype()), Some(Elem::F32 | Elem::F64)))
}

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

/// The images of the `.npy` file `path` (the first `limit` only) and their labels, as stored.
pub(super) fn load(path: &Path, limit: Option<usize>) -> Result<Stored> {
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
        return Err(count_mismatch(path, shape[0], &labels_path, label_shape[0]));
    }
    let n = limit.map_or(shape[0], |l| l.min(shape[0]));
    let per: usize = sample_shape.iter().product();
    let kind = element_kind(&images.dtype());
    let is_float = matches!(kind, Some(Elem::F32 | Elem::F64));
    let values = match kind {
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
    Ok(Stored { images: values, labels, sample_shape, source, normalised: is_float })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{load, stores_normalised_floats, Normalisation, Split};

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
            source: crate::data::NormalisationSource::Flags,
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
}
