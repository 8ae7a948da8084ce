//! `relucompile eval model.onnx --data fashion-mnist`: top-1 accuracy and throughput under
//! tract, optionally against a reference model.

use crate::data::{self, Normalisation, Split};
use crate::driver::eval::{eval, EvalOptions, Evaluation};
use crate::eval::evaluator::EvalReport;
use crate::eval::EngineChoice;
use anyhow::Result;
use std::path::PathBuf;

const LONG_ABOUT: &str = "\
Measure a model's top-1 accuracy and throughput under tract on a labelled image set, and \
optionally compare it with a reference model (accuracy, arg-max agreement, largest output \
difference). Batches run in parallel on every core; only inference is timed.

Data (--data): `fashion-mnist` is Debian's dataset-fashion-mnist package at \
/usr/share/datasets/fashion-mnist; a directory holds IDX files with the Fashion-MNIST names \
(t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz], train-...), CIFAR-10 binaries \
(data_batch_1.bin .. data_batch_5.bin, test_batch.bin), CIFAR-100 binaries (train.bin, \
test.bin; fine labels, or coarse with --coarse-labels), or an image-folder tree as \
torchvision's ImageFolder reads it (one folder of PNG/JPEG images per class, classes numbered \
in sorted name order; train/ and test/ or val/ folders give the splits); a .npy file holds \
images (float32, float64 or uint8; [N,H,W] or [N,C,H,W]) with integer labels in \
<stem>_labels.npy or labels.npy beside it. Nothing is ever downloaded.

Fitting: grey images are repeated to three channels for a colour model, colour images turned \
grey (Rec. 709 luma) for a grey one. --resize N scales every image so its shorter side is N \
pixels (bilinear), then --center-crop N or HxW keeps the centre (the ImageNet convention); \
otherwise images must have the model's height and width.

Pixel convention: the model is fed x = (pixel * scale - mean[c]) / std[c], where pixel is the \
value as stored (0..255 in IDX, CIFAR, PNG, JPEG and uint8 files) and c the channel. Each of scale, mean and std \
comes from its flag, else from the model's ONNX metadata (relucompile.scale, relucompile.mean, \
relucompile.std: comma-separated floats), else the default scale 1/255, mean 0, std 1. Float \
.npy images are taken as already normalised and fed as stored, unless a normalisation flag is \
given (then they are treated as pixels, with the same precedence).";

/// `-h` shows the short form; `--help` the whole of [`LONG_ABOUT`]. The text goes after the
/// options (not in `long_about`) because the subcommand's doc comment sets the about text.
const SHORT_HELP: &str = "\
Inputs are x = (pixel * scale - mean[c]) / std[c]; pixel as stored (0..255 for IDX). See --help.";

/// `--split`'s words.
const SPLITS: &[(&str, &str)] = &[
    ("train", "The training split"),
    ("test", "The test split (an image folder's val/ or test/)"),
];

#[derive(clap::Args, Debug)]
#[command(
    after_help = format!("{SHORT_HELP}\n\n{}", super::EXIT_CODES_HELP),
    after_long_help = format!("{LONG_ABOUT}\n\n{}", super::EXIT_CODES_HELP)
)]
pub struct EvalArgs {
    /// The ONNX model to evaluate
    pub model: PathBuf,
    /// The data: `fashion-mnist`, an IDX, CIFAR or image-folder directory, or a .npy file
    #[arg(long, value_name = "SPEC", default_value = data::FASHION_MNIST_SPEC)]
    pub data: String,
    /// Which split to read [default: test]
    #[arg(long, value_parser = super::words::<Split>(SPLITS))]
    pub split: Option<Split>,
    /// Evaluate the first N images only
    #[arg(long, value_name = "N", value_parser = super::data_flags::parse_positive)]
    pub limit: Option<usize>,
    /// Also run this model and compare: its accuracy, arg-max agreement, largest difference
    #[arg(long, value_name = "MODEL")]
    pub reference: Option<PathBuf>,
    /// Images per run, one run per thread at a time (default: the engine's best, 32 native,
    /// 1 for tract)
    #[arg(long, value_name = "N", value_parser = super::data_flags::parse_positive)]
    pub batch: Option<usize>,
    /// Which engine runs the models: the native engine when it takes the graph (else tract),
    /// only the native engine, or only tract
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    /// Input shape: one sample as `inspect` prints it (1x28x28) or with the batch (1x1x28x28)
    /// [default: the model's declared shape]
    #[arg(long, value_name = "SHAPE", value_parser = super::parse_shape)]
    // `::std::vec::Vec`: one value parsed whole, not a list of values (clap's derive rule).
    pub input_shape: Option<::std::vec::Vec<usize>>,
    #[command(flatten)]
    pub reporting: super::output_flags::OutputFlags,
    #[command(flatten)]
    pub data_flags: super::data_flags::DataFlags,
}

impl From<&EvalArgs> for EvalOptions {
    fn from(a: &EvalArgs) -> Self {
        EvalOptions {
            model: a.model.clone(),
            data: a.data.clone(),
            split: a.split,
            limit: a.limit,
            reference: a.reference.clone(),
            batch: a.batch,
            engine: a.engine,
            input_shape: a.input_shape.clone(),
            data_options: (&a.data_flags).into(),
            progress: a.reporting.progress(),
        }
    }
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let Evaluation { report, normalisation } = eval(&args.into())?;
    if args.reporting.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", human(&report, &normalisation));
    }
    Ok(())
}

/// The short aligned summary for people.
fn human(r: &EvalReport, norm: &Normalisation) -> String {
    let mut rows = vec![
        ("model", r.model.clone()),
        ("data", format!("{} ({}, {} images)", r.data, r.split, r.images)),
        ("inputs", format!("{norm}  ({})", norm.source.describe())),
        ("accuracy", format!("{:.2}%  ({} of {})", 100.0 * r.accuracy, r.correct, r.images)),
        (
            "speed",
            format!(
                "{:.1} images/s  ({:.2} s, {} engine, batch {}, {} threads)",
                r.images_per_second, r.seconds, r.engine, r.batch, r.threads
            ),
        ),
    ];
    if let Some(rf) = &r.reference {
        rows.push(("reference", rf.model.clone()));
        rows.push(("  accuracy", format!("{:.2}%", 100.0 * rf.accuracy)));
        rows.push((
            "  agreement",
            format!(
                "{:.2}%  (same arg-max), max |diff| {:.3e}",
                100.0 * rf.agreement,
                rf.max_abs_diff
            ),
        ));
    }
    if let Some(w) = &r.warning {
        rows.push(("warning", w.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Wrap {
        #[command(flatten)]
        args: EvalArgs,
    }

    #[test]
    fn parses_options() {
        let w = Wrap::try_parse_from([
            "x",
            "m.onnx",
            "--input-shape",
            "1x3x32x32",
            "--mean",
            "0.1,0.2,0.3",
            "--std",
            "0.5",
            "--scale",
            "0.00392",
            "--split",
            "train",
            "--limit",
            "10",
        ])
        .unwrap();
        let a = w.args;
        assert_eq!(a.input_shape, Some(vec![1, 3, 32, 32]));
        assert_eq!(a.data_flags.mean, Some(vec![0.1, 0.2, 0.3]));
        assert_eq!(a.data_flags.std, Some(vec![0.5]));
        assert_eq!(a.split, Some(Split::Train));
        assert_eq!((a.limit, a.batch, a.data.as_str()), (Some(10), None, "fashion-mnist"));
        for bad in [
            &["--input-shape", "1x3xq"][..],
            &["--mean", "a,b"],
            &["--limit", "0"],
            &["--batch", "-1"],
            &["--split", "val"],
        ] {
            let mut argv = vec!["x", "m.onnx"];
            argv.extend_from_slice(bad);
            assert!(Wrap::try_parse_from(argv).is_err(), "{bad:?} should be refused");
        }
        let w = Wrap::try_parse_from(["x", "m.onnx", "--mean", "-0.5"]).unwrap();
        assert_eq!(w.args.data_flags.mean, Some(vec![-0.5]));
    }

    #[test]
    fn human_summary_is_aligned() {
        let r = EvalReport {
            model: "m.onnx".into(),
            data: "d".into(),
            split: "test".into(),
            images: 10,
            correct: 9,
            accuracy: 0.9,
            seconds: 0.5,
            images_per_second: 20.0,
            batch: 10,
            threads: 2,
            engine: "native".into(),
            classes: 10,
            normalisation: None,
            warning: None,
            reference: Some(crate::eval::evaluator::ReferenceReport {
                model: "r.onnx".into(),
                accuracy: 0.8,
                agreement: 0.85,
                max_abs_diff: 0.25,
            }),
        };
        let text = human(&r, &Normalisation::default());
        assert!(text.contains("accuracy     90.00%  (9 of 10)"), "{text}");
        assert!(text.contains("  agreement  85.00%"), "{text}");
    }
}
