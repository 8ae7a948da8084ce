//! The data formats `--data` reads, on the committed fixtures of fixtures/data (see its
//! README): an image-folder tree of PNG and JPEG files, CIFAR-10 and CIFAR-100 binaries, and
//! the same images as `.npy` files. Each format decodes to exactly the pixels of its `.npy`
//! twin and so gives the same accuracy; onnxruntime, fed images this harness decodes itself,
//! agrees; a lossy compile reads each; `--no-eval` and the no-data error.
//!
//! `UPDATE_FIXTURES=1` rewrites fixtures/data/imagefolder_test.npy from the decoder (after
//! `python3 fixtures/data/make_data.py`): its JPEG entries are what the image crate's decoder
//! yields, not the pixels the generator encoded.

use crate::common::*;
use relucompile::data::{self, image_folder, Dataset, Fit, Normalisation, Split};
use std::path::Path;

const MODEL: &str = "fixtures/data/colour_resnet.onnx";
const TREE: &str = "fixtures/data/imagefolder";
const CIFAR10: &str = "fixtures/data/cifar10";
const CIFAR100: &str = "fixtures/data/cifar100";

/// Each format beside the `.npy` file holding the same test images, and how many of them the
/// fixture model classifies correctly (as make_data.py printed from onnxruntime).
const TWINS: &[(&str, &str, &str, u64, u64)] = &[
    (TREE, "fixtures/data/imagefolder_test.npy", "npy", 15, 12),
    (CIFAR10, "fixtures/data/cifar10_test.npy", "cifar10", 8, 6),
    (CIFAR100, "fixtures/data/cifar100_test.npy", "cifar100", 8, 6),
];

/// The largest difference between the image crate's and Pillow's (libjpeg's) decoding of a
/// JPEG fixture: their IDCT and chroma upsampling round differently. Measured 1 to 3 on these
/// files (JPEG's own loss against the encoded pixels is up to 46).
const JPEG_TOLERANCE: f32 = 4.0;

/// The test split of `spec`, as stored (no normalisation), fitted to the fixture model.
fn pixels(spec: &str, coarse: bool) -> Dataset {
    let fit = Fit { shape: Some(vec![3, 32, 32]), coarse_labels: coarse, ..Fit::default() };
    data::load_fitted(spec, Split::Test, None, &Normalisation::identity(), &fit).unwrap().0
}

fn read_u8_npy(rel: &str) -> (Vec<f32>, Vec<u32>) {
    let open = |p: &Path| {
        npyz::NpyFile::new(std::io::BufReader::new(std::fs::File::open(p).unwrap())).unwrap()
    };
    let images: Vec<u8> = open(&path(rel)).into_vec().unwrap();
    let labels: Vec<i64> = open(&path(&rel.replace(".npy", "_labels.npy"))).into_vec().unwrap();
    (images.into_iter().map(f32::from).collect(), labels.into_iter().map(|l| l as u32).collect())
}

fn write_u8_npy(rel: &str, d: &Dataset) {
    let mut shape = vec![d.len() as u64];
    shape.extend(d.sample_shape.iter().map(|&s| s as u64));
    assert!(d.images.iter().all(|v| v.fract() == 0.0 && (0.0..=255.0).contains(v)));
    let pixels: Vec<u8> = d.images.iter().map(|&v| v as u8).collect();
    write_npy(&path(rel), &shape, &pixels);
    let labels: Vec<i64> = d.labels.iter().map(|&l| i64::from(l)).collect();
    write_npy(&path(&rel.replace(".npy", "_labels.npy")), &[d.len() as u64], &labels);
}

#[test]
fn image_folder_decodes_to_the_committed_pixels() {
    let d = pixels(TREE, false);
    if std::env::var("UPDATE_FIXTURES").as_deref() == Ok("1") {
        write_u8_npy("fixtures/data/imagefolder_test.npy", &d);
    }
    let (images, labels) = read_u8_npy("fixtures/data/imagefolder_test.npy");
    assert_eq!(d.sample_shape, vec![3, 32, 32]);
    assert_eq!(d.labels, labels);
    assert!(d.images == images, "the tree no longer decodes to imagefolder_test.npy");

    // Against Pillow's decoding: PNG exactly (the pixels encoded), JPEG up to rounding.
    let (source, source_labels) = read_u8_npy("fixtures/data/imagefolder_test_pillow.npy");
    assert_eq!(source_labels, labels);
    let files = image_folder::list(&path(TREE), Split::Test).unwrap();
    assert_eq!(files.len(), 15);
    let per = 3 * 32 * 32;
    let mut jpegs = 0;
    for (i, (file, label)) in files.iter().enumerate() {
        assert_eq!(*label, labels[i]);
        let ours = &d.images[i * per..(i + 1) * per];
        let theirs = &source[i * per..(i + 1) * per];
        let ext = file.extension().unwrap().to_string_lossy().to_lowercase();
        if ext == "png" {
            assert!(ours == theirs, "{} decodes to other pixels than Pillow's", file.display());
        } else {
            jpegs += 1;
            let worst = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst <= JPEG_TOLERANCE, "{}: off by {worst}", file.display());
        }
    }
    assert_eq!(jpegs, 6);
}

#[test]
fn cifar_binaries_decode_to_their_npy_twins() {
    for (spec, npy, ..) in &TWINS[1..] {
        let d = pixels(spec, false);
        let (images, labels) = read_u8_npy(npy);
        assert_eq!((d.sample_shape.clone(), d.labels.clone()), (vec![3, 32, 32], labels));
        assert!(d.images == images, "{spec} differs from {npy}");
    }
    // The fixture's coarse labels are fine / 5 (make_data.py).
    let fine = pixels(CIFAR100, false);
    let coarse = pixels(CIFAR100, true);
    assert_eq!(coarse.labels, fine.labels.iter().map(|l| l / 5).collect::<Vec<_>>());
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["eval", MODEL, "--json", "--no-progress"];
    all.extend_from_slice(args);
    relucompile_json(&all)
}

#[test]
fn every_format_gives_the_accuracy_of_its_npy_twin() {
    for &(spec, npy, _, images, correct) in TWINS {
        let a = eval_json(&["--data", spec]);
        let b = eval_json(&["--data", npy]);
        assert_eq!((&a["images"], &a["correct"]), (&b["images"], &b["correct"]), "{spec}");
        assert_eq!(a["accuracy"], b["accuracy"], "{spec}");
        assert_eq!((a["images"].as_u64(), a["correct"].as_u64()), (Some(images), Some(correct)));
        assert_eq!((a["split"].as_str(), b["split"].as_str()), (Some("test"), Some("npy")));
    }
    // The training split of each is read too.
    for (spec, n) in [(TREE, 12), (CIFAR10, 12), (CIFAR100, 10)] {
        assert_eq!(eval_json(&["--data", spec, "--split", "train"])["images"], n, "{spec}");
    }
}

/// `relucompile MODEL -o out --json` plus `args`.
fn compile(out: &Path, args: &[&str]) -> Output {
    let mut all = vec![MODEL, "-o", out.to_str().unwrap(), "--no-progress"];
    all.extend_from_slice(args);
    relucompile(&all)
}

#[test]
fn lossy_compile_reads_every_format_and_onnxruntime_agrees() {
    let dir = tmpdir();
    let mut cases = Vec::new();
    for &(spec, npy, format, images, correct) in TWINS {
        let out = dir.path().join(format!("{format}.onnx"));
        let o = compile(&out, &["--cull", "1", "--data", spec, "--json"]);
        assert_eq!(o.code, 0, "{spec}: {}", o.stderr);
        let report: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        let acc = &report["accuracy"];
        assert_eq!((acc["data"].as_str(), acc["images"].as_u64()), (Some(spec), Some(images)));
        assert_eq!(acc["before"].as_f64(), Some(correct as f64 / images as f64), "{spec}");
        assert_eq!(report["after"]["total_relus"], 34_816 - 16_384);
        // Recalibrated on the training split of the same data.
        assert!(report["pipeline"].as_str().unwrap().contains("recalibrate"), "{report}");
        assert!(out.is_file());
        // onnxruntime's accuracy on images the harness decodes itself (CIFAR) or on the
        // decoded pixels (the tree, through its npy twin), before and after.
        let (data, format) = if format == "npy" { (npy, "npy") } else { (spec, format) };
        for (model, expected) in [(path(MODEL), &acc["before"]), (out.clone(), &acc["after"])] {
            cases.push(serde_json::json!({"model": model, "accuracy": {
                "data": path(data), "format": format, "split": "test",
                "expected": expected, "images": images}}));
        }
    }
    // Calibration statistics come from the tree's training split.
    let out = dir.path().join("channels.onnx");
    let o = compile(&out, &["--channel-threshold", "0.9", "--data", TREE, "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    if python_ready(&["numpy", "onnx", "onnxruntime"]) {
        let report = cross_check(dir.path(), &cases);
        assert!(report.contains("accuracy 6/8"), "{report}");
    }
}

#[test]
fn no_data_that_fits_names_data_and_no_eval() {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    // The default data (Fashion-MNIST, installed or not) and a .npy of 1x28x28 images.
    for extra in [&[][..], &["--data", "fixtures/images/fmnist_test_64.npy"]] {
        let mut args = vec!["--cull", "1", "--thin", "bottom"];
        args.extend_from_slice(extra);
        let o = compile(&out, &args);
        assert_eq!(o.code, 6, "{extra:?}: {}{}", o.stdout, o.stderr);
        for needle in ["--data", "--no-eval", "accuracy", "CIFAR", "PNG/JPEG"] {
            assert!(o.stderr.contains(needle), "{needle} missing: {}", o.stderr);
        }
        assert!(!out.exists());
    }
    let o = compile(&out, &["--cull", "1", "--data", "fixtures/images/fmnist_test_64.npy"]);
    assert!(o.stderr.contains("1x28x28 but fixtures/data/colour_resnet.onnx expects 3x32x32"));
    assert!(o.stdout.is_empty(), "data is checked before any pass runs: {}", o.stdout);
}

#[test]
fn no_eval_writes_the_census_and_warns() {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    let o = compile(&out, &["--cull", "1,2", "--thin", "bottom", "--no-eval", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let report: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(report["accuracy"].is_null());
    assert!(report["accuracy_not_measured"].as_str().unwrap().contains("not measured"));
    // Recalibration needs calibration images too: --no-eval goes without it.
    assert!(!report["pipeline"].as_str().unwrap().contains("recalibrate"), "{report}");
    assert_eq!(report["after"]["total_relus"], 8_192 + 1_024);
    assert!(o.stderr.contains("warning: the accuracy of"), "{}", o.stderr);
    assert!(out.is_file());
    // People see the census and the warning.
    std::fs::remove_file(&out).unwrap();
    let o = compile(&out, &["--cull", "1", "--no-eval"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("total ReLUs"), "{}", o.stdout);
    assert!(o.stderr.contains("not measured (--no-eval)"), "{}", o.stderr);
    // The gate cannot run without a measurement, and says so.
    std::fs::remove_file(&out).unwrap();
    let o = compile(&out, &["--cull", "1", "--no-eval", "--max-drop", "1"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--max-drop") && o.stderr.contains("--no-eval"), "{}", o.stderr);
    assert!(!out.exists());
}

#[test]
fn resize_and_center_crop_fit_larger_images() {
    // The CIFAR-10 test images at twice the size with 4 grey rows above and below: 72x64.
    let dir = tmpdir();
    let (images, labels) = read_u8_npy("fixtures/data/cifar10_test.npy");
    for (i, label) in labels.iter().enumerate() {
        let img = &images[i * 3072..(i + 1) * 3072];
        let big = image::RgbImage::from_fn(64, 72, |x, y| match y {
            4..68 => {
                let at = |c: usize| img[c * 1024 + ((y as usize - 4) / 2) * 32 + x as usize / 2];
                image::Rgb([at(0) as u8, at(1) as u8, at(2) as u8])
            }
            _ => image::Rgb([128, 128, 128]),
        });
        let class = dir.path().join(format!("class{label}"));
        std::fs::create_dir_all(&class).unwrap();
        big.save(class.join(format!("{i}.png"))).unwrap();
    }
    let spec = dir.path().to_str().unwrap();
    let o = relucompile(&["eval", MODEL, "--data", spec]);
    assert_eq!(o.code, 6, "{}", o.stderr);
    assert!(o.stderr.contains("is 3x72x64 but fixtures/data/colour_resnet.onnx expects 3x32x32"));
    assert!(o.stderr.contains("--resize and --center-crop"), "{}", o.stderr);
    let a = eval_json(&["--data", spec, "--resize", "32", "--center-crop", "32"]);
    assert_eq!((a["images"].as_u64(), a["split"].as_str()), (Some(8), Some("all")));
    // The labels are the class folders' sorted positions, not their names: check the count.
    let o = relucompile(&["eval", MODEL, "--data", spec, "--resize", "32", "--center-crop", "32"]);
    assert!(o.stderr.contains("8 images in"), "{}", o.stderr);
    assert!(o.stderr.contains("fitted by --resize 32 --center-crop 32x32"), "{}", o.stderr);
    // A tree without train/ and test/ is one set.
    let o = relucompile(&["eval", MODEL, "--data", spec, "--split", "train"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("image folder without train/ and test/"), "{}", o.stderr);
}
