//! CIFAR-10 and CIFAR-100 in their binary versions (the `-binary` tarballs' directories).
//!
//! CIFAR-10 (`cifar-10-batches-bin`): `data_batch_1.bin` .. `data_batch_5.bin` (training, read
//! in that order) and `test_batch.bin`; each record is one label byte (0-9) then 3,072 pixel
//! bytes: the red, green and blue 32x32 planes, rows top to bottom.
//! CIFAR-100 (`cifar-100-binary`): `train.bin` and `test.bin`; each record is a coarse label
//! byte (0-19), a fine label byte (0-99), then the same 3,072 pixel bytes. The fine labels are
//! used unless [`super::Fit::coarse_labels`] asks for the coarse ones.

use super::{Split, Stored};
use crate::error::CompileError;
use anyhow::Result;
use std::io::Read;
use std::path::{Path, PathBuf};

const PIXELS: usize = 3 * 32 * 32;

/// Which of the two binary layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cifar {
    Ten,
    Hundred,
}

impl Cifar {
    /// The layout of the files in `dir`, if it holds CIFAR binaries.
    pub(super) fn detect(dir: &Path) -> Option<Cifar> {
        if dir.join("test_batch.bin").is_file() || !training_batches(dir).is_empty() {
            Some(Cifar::Ten)
        } else if dir.join("train.bin").is_file() || dir.join("test.bin").is_file() {
            Some(Cifar::Hundred)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cifar::Ten => "CIFAR-10",
            Cifar::Hundred => "CIFAR-100",
        }
    }

    /// Label bytes before the pixels of each record.
    fn label_bytes(self) -> usize {
        match self {
            Cifar::Ten => 1,
            Cifar::Hundred => 2,
        }
    }

    /// The files of `split`, in reading order.
    fn files(self, dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
        let (files, expected) = match (self, split) {
            (Cifar::Ten, Split::Train) => {
                (training_batches(dir), "data_batch_1.bin .. data_batch_5.bin")
            }
            (Cifar::Ten, Split::Test) => (vec![dir.join("test_batch.bin")], "test_batch.bin"),
            (Cifar::Hundred, Split::Train) => (vec![dir.join("train.bin")], "train.bin"),
            (Cifar::Hundred, Split::Test) => (vec![dir.join("test.bin")], "test.bin"),
        };
        if files.is_empty() || !files.iter().all(|f| f.is_file()) {
            return Err(CompileError::invalid_data(format!(
                "no {split} images in the {} directory {}: expected {expected}",
                self.name(),
                dir.display()
            ))
            .into());
        }
        Ok(files)
    }
}

/// `data_batch_<n>.bin` in `dir`, by `n`.
fn training_batches(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut batches: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("data_batch_")?.strip_suffix(".bin")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    batches.sort();
    batches.into_iter().map(|(_, p)| p).collect()
}

/// The records of `split` in `dir` (the first `limit` only), as stored: pixels 0..255.
pub(super) fn load(
    dir: &Path,
    kind: Cifar,
    split: Split,
    limit: Option<usize>,
    coarse: bool,
) -> Result<Stored> {
    let record = kind.label_bytes() + PIXELS;
    let (label_at, classes, what) = match (kind, coarse) {
        (Cifar::Ten, _) => (0, 10, "CIFAR-10 class"),
        (Cifar::Hundred, true) => (0, 20, "CIFAR-100 coarse class"),
        (Cifar::Hundred, false) => (1, 100, "CIFAR-100 fine class"),
    };
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for file in kind.files(dir, split)? {
        let want = limit.map_or(usize::MAX, |l| l - labels.len());
        if want == 0 {
            break;
        }
        let bytes = read_records(&file, record, want)?;
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            let label = rec[label_at];
            if usize::from(label) >= classes {
                return Err(CompileError::invalid_data(format!(
                    "{}: record {i} has label {label}, not a {what} (0-{}){}",
                    file.display(),
                    classes - 1,
                    if kind == Cifar::Ten { ": is this a CIFAR-100 file?" } else { "" }
                ))
                .into());
            }
            labels.push(u32::from(label));
            images.extend(rec[kind.label_bytes()..].iter().map(|&p| f32::from(p)));
        }
    }
    Ok(Stored {
        images,
        labels,
        sample_shape: vec![3, 32, 32],
        source: dir.display().to_string(),
        normalised: false,
    })
}

/// The first `want` records of `file` (all when it holds fewer), after checking that the file
/// is a whole, non-zero number of records.
fn read_records(file: &Path, record: usize, want: usize) -> Result<Vec<u8>> {
    let bad = |msg: String| -> anyhow::Error {
        CompileError::invalid_data(format!("{}: {msg}", file.display())).into()
    };
    let len = std::fs::metadata(file).map_err(|e| bad(format!("cannot read it: {e}")))?.len();
    if len == 0 || len % record as u64 != 0 {
        return Err(bad(format!(
            "{len} bytes is not a whole number of {record}-byte records: truncated, or not a \
             CIFAR binary file of this kind"
        )));
    }
    let keep = (len / record as u64).min(want as u64) * record as u64;
    let mut bytes = Vec::with_capacity(keep as usize);
    std::fs::File::open(file)
        .and_then(|f| f.take(keep).read_to_end(&mut bytes))
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if (bytes.len() as u64) < keep {
        return Err(bad(format!("ends after {} of {len} bytes", bytes.len())));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::assert_data_error;
    use super::super::{load, load_fitted, resolve_spec, Fit, Normalisation, Source};
    use super::*;
    use crate::error::{exit_code_of, ExitCode};

    /// `n` records whose pixels are all `first + i` and labels `labels(i)`.
    fn records(n: usize, first: u8, labels: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let mut r = labels(i);
                r.extend(std::iter::repeat_n(first + i as u8, PIXELS));
                r
            })
            .collect()
    }

    fn spec(dir: &Path) -> String {
        dir.display().to_string()
    }

    #[test]
    fn cifar10_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&d).unwrap();
        // data_batch_10 sorts after data_batch_2 (by number, not by name).
        std::fs::write(d.join("data_batch_10.bin"), records(2, 100, |i| vec![i as u8])).unwrap();
        std::fs::write(d.join("data_batch_2.bin"), records(3, 10, |i| vec![9 - i as u8])).unwrap();
        std::fs::write(d.join("test_batch.bin"), records(1, 50, |_| vec![4])).unwrap();
        std::fs::write(d.join("batches.meta.txt"), "airplane\n").unwrap();
        // The tarball's folder is found from its parent.
        let parent = spec(dir.path());
        assert_eq!(resolve_spec(&parent).unwrap(), Source::Cifar(Cifar::Ten, d.clone()));
        let id = Normalisation::identity();
        let train = load(&parent, Split::Train, None, &id).unwrap();
        assert_eq!(train.labels, vec![9, 8, 7, 0, 1]);
        assert_eq!(train.sample_shape, vec![3, 32, 32]);
        assert_eq!((train.sample(2)[0], train.sample(3)[3071]), (12.0, 100.0));
        // A limit across batches reads only what it needs.
        assert_eq!(load(&parent, Split::Train, Some(4), &id).unwrap().labels, vec![9, 8, 7, 0]);
        let test = load(&spec(&d), Split::Test, None, &id).unwrap();
        assert_eq!((test.labels.clone(), test.sample(0)[7]), (vec![4], 50.0));
        // --coarse-labels is for CIFAR-100 only.
        let coarse = Fit { coarse_labels: true, ..Fit::default() };
        let e = load_fitted(&parent, Split::Test, None, &id, &coarse).unwrap_err();
        assert_eq!(exit_code_of(&e), ExitCode::Usage, "{e:#}");
    }

    #[test]
    fn cifar10_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let id = Normalisation::identity();
        let mut bytes = records(2, 0, |_| vec![3]);
        std::fs::write(d.join("test_batch.bin"), &bytes[..bytes.len() - 10]).unwrap();
        assert_data_error(
            load(&spec(d), Split::Test, None, &id),
            &["test_batch.bin", "3073-byte records", "truncated"],
        );
        bytes[3073] = 37;
        std::fs::write(d.join("test_batch.bin"), &bytes).unwrap();
        assert_data_error(
            load(&spec(d), Split::Test, None, &id),
            &["test_batch.bin", "record 1 has label 37", "CIFAR-100"],
        );
        assert_data_error(
            load(&spec(d), Split::Train, None, &id),
            &["no train images", "data_batch_1.bin"],
        );
    }

    #[test]
    fn cifar100_fine_and_coarse() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let bytes = records(3, 1, |i| vec![i as u8 + 10, i as u8 * 30]);
        std::fs::write(d.join("train.bin"), &bytes).unwrap();
        assert_eq!(resolve_spec(&spec(d)).unwrap(), Source::Cifar(Cifar::Hundred, d.into()));
        let id = Normalisation::identity();
        let fine = load(&spec(d), Split::Train, None, &id).unwrap();
        assert_eq!(fine.labels, vec![0, 30, 60]);
        assert_eq!(fine.sample(1)[0], 2.0);
        let coarse = Fit { coarse_labels: true, ..Fit::default() };
        let (c, _) = load_fitted(&spec(d), Split::Train, None, &id, &coarse).unwrap();
        assert_eq!((c.labels, c.images), (vec![10, 11, 12], fine.images));
        // 25 is no coarse class; a CIFAR-10 file is not a whole number of CIFAR-100 records.
        std::fs::write(d.join("train.bin"), records(1, 0, |_| vec![25, 3])).unwrap();
        assert_data_error(
            load_fitted(&spec(d), Split::Train, None, &id, &coarse).map(|(d, _)| d),
            &["train.bin", "label 25", "coarse"],
        );
        std::fs::write(d.join("train.bin"), records(2, 0, |_| vec![3])).unwrap();
        assert_data_error(load(&spec(d), Split::Train, None, &id), &["train.bin", "3074-byte"]);
        assert_data_error(load(&spec(d), Split::Test, None, &id), &["no test images", "test.bin"]);
    }
}
