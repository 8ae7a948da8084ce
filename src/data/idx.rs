//! IDX files (MNIST, Fashion-MNIST): a directory holding `train-images-idx3-ubyte`,
//! `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each plain
//! or gzip (`.gz`), or with MNIST's dotted names (`t10k-images.idx3-ubyte`). Images are
//! `[N,H,W]` (one channel) or `[N,C,H,W]`, of any IDX element type; labels are integers.

use super::{labels_from_ints, Split, Stored};
use crate::error::CompileError;
use anyhow::Result;
use flate2::read::GzDecoder;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Whether `dir` holds any IDX file (by name), which makes it an IDX data set.
pub(super) fn holds_idx(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().to_lowercase();
        ["-idx1-ubyte", "-idx3-ubyte", "-idx4-ubyte", ".idx1-ubyte", ".idx3-ubyte", ".idx4-ubyte"]
            .iter()
            .any(|suffix| name.ends_with(suffix) || name.ends_with(&format!("{suffix}.gz")))
    })
}

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

/// The images and labels of `split` in `dir` (the first `limit` only), as stored.
pub(super) fn load(dir: &Path, split: Split, limit: Option<usize>) -> Result<Stored> {
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
    Ok(Stored { images: idx_values(&images), labels, sample_shape, source, normalised: false })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{load, Normalisation, Split};
    use crate::error::{exit_code_of, ExitCode};
    use std::fs::File;
    use std::io::Write;
    use std::path::Path;

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
        let norm = Normalisation {
            scale: 1.0 / 255.0,
            mean: vec![0.5],
            std: vec![0.25],
            source: crate::data::NormalisationSource::Flags,
        };
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
}
