//! Top-1 accuracy and throughput of a model, optionally against a reference model.
//!
//! Inference is batched and spread over every core: the batches of a data set are independent,
//! so rayon hands them to its threads and every thread runs the same shared [`Backend`] (the
//! native engine, or tract for graphs it does not take; see [`super::backend`] for batch sizes).
//! Only inference is timed (not loading, normalising or preparing the plan).

use super::compare::argmax;
use super::{Backend, RunSpec};
use crate::analysis::shapes::declared_input_shape;
use crate::data::{check_fits_named, Dataset};
use crate::error::CompileError;
use crate::frontend::to_bytes;
use crate::ir::Model;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use std::io::IsTerminal;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    /// `test` or `train` for IDX data; [`evaluate`] leaves it empty for the caller to fill.
    pub split: String,
    pub images: usize,
    pub correct: usize,
    /// Top-1 accuracy, 0..1.
    pub accuracy: f64,
    /// Wall-clock seconds of the model's inference (the reference's is not included).
    pub seconds: f64,
    pub images_per_second: f64,
    pub batch: usize,
    pub threads: usize,
    /// `native` or `tract`: what ran the model.
    pub engine: String,
    /// Outputs per image: the classes, for chance-level checks.
    pub classes: usize,
    pub reference: Option<ReferenceReport>,
    /// How pixels became the model's inputs, and what states it (the caller fills it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalisation: Option<crate::data::Normalisation>,
    /// Set when the accuracy is near chance (the caller fills it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReferenceReport {
    pub model: String,
    pub accuracy: f64,
    /// Fraction of images where both arg-maxes agree.
    pub agreement: f64,
    /// Largest absolute difference between the two models' outputs over every image.
    pub max_abs_diff: f32,
}

/// Run `runner` over every image of `data`, batches in parallel. Returns every image's outputs
/// (row-major) and the number of outputs per image.
pub fn predict(
    runner: &Backend,
    data: &Dataset,
    progress: Option<&ProgressBar>,
) -> Result<(Vec<f32>, usize)> {
    let per = data.sample_len();
    if runner.sample_len() != per {
        return Err(CompileError::invalid_data(format!(
            "images in {} hold {per} values each but the model runs on {} values per sample",
            data.source,
            runner.sample_len()
        ))
        .into());
    }
    let chunks: Vec<&[f32]> = data.images.chunks(runner.batch() * per).collect();
    let outputs = chunks
        .par_iter()
        .map(|chunk| {
            let out = runner.run(chunk);
            if let Some(bar) = progress {
                bar.inc((chunk.len() / per) as u64);
            }
            out
        })
        .collect::<Result<Vec<_>>>()?;
    let classes = outputs.first().map_or(0, |(_, w)| *w);
    let mut logits = Vec::with_capacity(classes * data.len());
    for (out, width) in outputs {
        anyhow::ensure!(
            width == classes,
            "the model's output size changed between batches ({classes} then {width})"
        );
        logits.extend(out);
    }
    Ok((logits, classes))
}

/// Accuracy and throughput of `model` on `data`; with a reference, also the reference's
/// accuracy and how far the two agree. Each model runs once over the data (a reference that
/// is the very same graph is not run again). The data must already be normalised for the
/// model and shaped as it expects (see [`super::data::check_fits`]).
pub fn evaluate(
    model: &Model,
    model_name: &str,
    reference: Option<(&Model, &str)>,
    data: &Dataset,
    spec: RunSpec,
    show_progress: bool,
) -> Result<EvalReport> {
    let reference = reference.map(|(m, name)| Reference::Model(m, name));
    Ok(evaluate_against(model, model_name, reference, data, spec, show_progress)?.0)
}

/// A model's outputs on a data set, kept so that later evaluations on the same images compare
/// against them instead of running the model again.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub name: String,
    pub logits: Vec<f32>,
    pub classes: usize,
}

/// Top-1 accuracy of `outputs` against `data`'s labels.
pub fn accuracy_of(outputs: &Outputs, data: &Dataset) -> f64 {
    let correct = outputs
        .logits
        .chunks(outputs.classes.max(1))
        .zip(&data.labels)
        .filter(|(row, &label)| argmax(row) == label as usize)
        .count();
    correct as f64 / data.len().max(1) as f64
}

/// What an evaluation compares its model with.
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    /// A model, run on the same images.
    Model(&'a Model, &'a str),
    /// Outputs of a model on the same images, computed before.
    Outputs(&'a Outputs),
}

/// [`evaluate`] against a reference model or its outputs; also returns the model's outputs.
pub fn evaluate_against(
    model: &Model,
    model_name: &str,
    reference: Option<Reference>,
    data: &Dataset,
    spec: RunSpec,
    show_progress: bool,
) -> Result<(EvalReport, Outputs)> {
    if data.is_empty() {
        return Err(CompileError::invalid_data(format!("{} holds no images", data.source)).into());
    }
    anyhow::ensure!(spec.batch != Some(0), "the batch size must be at least 1");
    // A batch larger than the data would only run padding.
    let spec = RunSpec { batch: spec.batch.map(|b| b.min(data.len())), ..spec };
    let runner = prepare(model, model_name, data, spec)?;
    // A reference that serialises to the same bytes computes the same outputs.
    let ref_runner = match reference {
        Some(Reference::Model(r, name)) if to_bytes(r) != to_bytes(model) => {
            Some(prepare(r, name, data, spec)?)
        }
        _ => None,
    };

    // The model and the reference run in two timed passes over the same loaded data, so that
    // the throughput reported is the model's own.
    let bar = progress_bar(data.len(), model_name, show_progress);
    let start = Instant::now();
    let result = predict(&runner, data, Some(&bar));
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let (logits, classes) = result.with_context(|| format!("running {model_name}"))?;
    let predictions = check_labels_and_predict(&logits, classes, data, model_name)?;
    let correct = predictions.iter().zip(&data.labels).filter(|(p, l)| **p == **l as usize).count();

    let reference_outputs = match (reference, ref_runner) {
        (Some(Reference::Model(_, name)), Some(rr)) => {
            let bar = progress_bar(data.len(), &format!("reference {name}"), show_progress);
            let result = predict(&rr, data, Some(&bar));
            bar.finish_and_clear();
            let (logits, classes) =
                result.with_context(|| format!("running the reference {name}"))?;
            Some(std::borrow::Cow::Owned(Outputs { name: name.to_string(), logits, classes }))
        }
        (Some(Reference::Outputs(o)), _) => Some(std::borrow::Cow::Borrowed(o)),
        _ => None,
    };
    let reference = match (reference, reference_outputs) {
        (_, Some(outputs)) => {
            let (name, ref_logits, ref_classes) =
                (outputs.name.as_str(), &outputs.logits, outputs.classes);
            anyhow::ensure!(
                ref_logits.len() == ref_classes * data.len(),
                "the reference {name}'s outputs are not of these {} images",
                data.len()
            );
            if ref_classes != classes {
                return Err(CompileError::invalid_data(format!(
                    "the reference {name} has {ref_classes} outputs per image but {model_name} \
                     has {classes}: they cannot be compared"
                ))
                .into());
            }
            let ref_predictions = check_labels_and_predict(ref_logits, classes, data, name)?;
            let ref_correct = ref_predictions
                .iter()
                .zip(&data.labels)
                .filter(|(p, l)| **p == **l as usize)
                .count();
            let agree = predictions.iter().zip(&ref_predictions).filter(|(a, b)| a == b).count();
            let max_abs_diff = logits.iter().zip(ref_logits).fold(0f32, |m, (a, b)| {
                let d = (a - b).abs();
                if d.is_nan() || m.is_nan() {
                    f32::NAN
                } else {
                    m.max(d)
                }
            });
            Some(ReferenceReport {
                model: name.to_string(),
                accuracy: ref_correct as f64 / data.len() as f64,
                agreement: agree as f64 / data.len() as f64,
                max_abs_diff,
            })
        }
        (Some(Reference::Model(_, name)), None) => Some(ReferenceReport {
            model: name.to_string(),
            accuracy: correct as f64 / data.len() as f64,
            agreement: 1.0,
            max_abs_diff: 0.0,
        }),
        _ => None,
    };

    let report = EvalReport {
        model: model_name.to_string(),
        data: data.source.clone(),
        split: String::new(),
        images: data.len(),
        correct,
        accuracy: correct as f64 / data.len() as f64,
        seconds,
        images_per_second: data.len() as f64 / seconds.max(f64::MIN_POSITIVE),
        batch: runner.batch(),
        threads: rayon::current_num_threads(),
        engine: runner.name().to_string(),
        classes,
        reference,
        normalisation: None,
        warning: None,
    };
    Ok((report, Outputs { name: model_name.to_string(), logits, classes }))
}

/// A backend for `model` on samples of the data's shape. A model may well run on another size
/// than it declares (`--input-shape`), so the declaration is consulted only when the engines
/// refuse: then a data shape that differs from it is the error to report (exit 6), naming both
/// shapes.
fn prepare(model: &Model, name: &str, data: &Dataset, spec: RunSpec) -> Result<Backend> {
    Backend::new(model, &data.sample_shape, spec)
        .or_else(|e| check_declared_shape(model, name, data).and(Err(e)))
        .with_context(|| format!("preparing {name} to run"))
}

/// When the model declares a concrete per-sample input shape, the data must have it.
fn check_declared_shape(model: &Model, name: &str, data: &Dataset) -> Result<()> {
    let Ok(declared) = declared_input_shape(model) else { return Ok(()) };
    let sample: Option<Vec<usize>> = declared.iter().skip(1).copied().collect();
    match sample {
        Some(s) if !declared.is_empty() => check_fits_named(data, &s, name),
        _ => Ok(()),
    }
}

/// Arg-max of every image's outputs, after checking that every label names an output.
fn check_labels_and_predict(
    logits: &[f32],
    classes: usize,
    data: &Dataset,
    name: &str,
) -> Result<Vec<usize>> {
    if classes == 0 {
        return Err(CompileError::invalid_model(format!("{name} produces no outputs")).into());
    }
    if let Some((i, l)) = data.labels.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
        return Err(CompileError::invalid_data(format!(
            "label {l} of image {i} in {} is not a class of {name}, which has {classes} outputs",
            data.source
        ))
        .into());
    }
    Ok(logits.chunks(classes).map(argmax).collect())
}

/// A progress bar on stderr with images/s and ETA (plain lines when stderr is not a terminal);
/// hidden when progress is off.
pub fn progress_bar(len: usize, label: &str, show: bool) -> ProgressBar {
    counted_progress_bar(len, label, "images", show)
}

/// A milestone (an epoch, a trained point) as one line on stderr when progress is shown and
/// stderr is not a terminal: a pipeline's log sees every one, where a terminal has its bars.
pub fn progress_line(show: bool, line: impl FnOnce() -> String) {
    if show && !std::io::stderr().is_terminal() {
        eprintln!("{}", line());
    }
}

/// A progress bar counting `unit`s (images, candidates) with their rate and an ETA.
pub fn counted_progress_bar(
    len: usize,
    label: &str,
    unit: &'static str,
    show: bool,
) -> ProgressBar {
    let terminal = std::io::stderr().is_terminal();
    let target = match (show, terminal) {
        (true, true) => ProgressDrawTarget::stderr(),
        // A pipeline's log (CI, a subprocess, a notebook) gets plain lines instead of a bar.
        (true, false) => ProgressDrawTarget::term_like_with_hz(Box::new(PlainLines::default()), 1),
        (false, _) => ProgressDrawTarget::hidden(),
    };
    let bar = ProgressBar::with_draw_target(Some(len as u64), target);
    let template = if terminal {
        format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{rate}}  ETA {{eta}}")
    } else {
        format!("{{msg}}: {{pos}}/{{len}} {unit}, {{rate}}, {{elapsed}} elapsed, ETA {{eta}}")
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        let rate = move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.1} {unit}/s", state.per_sec());
        };
        bar.set_style(style.with_key("rate", rate).progress_chars("=> "));
    }
    bar.set_message(label.to_string());
    bar
}

/// Seconds of work before the first plain progress line (shorter work prints none), and
/// between two lines: a log shows a long command alive without a line a second.
const PLAIN_PROGRESS_FIRST_S: u64 = 5;
const PLAIN_PROGRESS_EVERY_S: u64 = 15;

/// A progress bar's "terminal" when stderr is none: each redraw is a plain line, printed when
/// [`PLAIN_PROGRESS_FIRST_S`] have passed since the bar began and then every
/// [`PLAIN_PROGRESS_EVERY_S`].
#[derive(Debug)]
struct PlainLines {
    started: Instant,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Default for PlainLines {
    fn default() -> Self {
        PlainLines { started: Instant::now(), last: std::sync::Mutex::new(None) }
    }
}

impl indicatif::TermLike for PlainLines {
    fn width(&self) -> u16 {
        200
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, line: &str) -> std::io::Result<()> {
        let line = line.trim_end();
        if line.is_empty() || self.started.elapsed().as_secs() < PLAIN_PROGRESS_FIRST_S {
            return Ok(());
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed().as_secs() >= PLAIN_PROGRESS_EVERY_S) {
            eprintln!("{line}");
            *last = Some(Instant::now());
        }
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.write_line(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load, Normalisation, Split};
    use crate::frontend::load_model;
    use std::path::Path;

    const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/models/tiny_ts_opset13.onnx");

    fn tiny_data(n: usize, sample: &[usize], labels: u32) -> Dataset {
        let per: usize = sample.iter().product();
        Dataset {
            images: crate::data::random_inputs(n * per, 7),
            labels: (0..n as u32).map(|i| i % labels).collect(),
            sample_shape: sample.to_vec(),
            source: "random".into(),
        }
    }

    #[test]
    fn batched_parallel_matches_one_by_one() {
        let model = load_model(Path::new(TINY)).unwrap();
        let sample = crate::analysis::shapes::sample_shape(&model, None).unwrap();
        let data = tiny_data(37, &sample, 1);
        let spec = RunSpec { batch: Some(8), ..RunSpec::default() };
        let whole = Backend::new(&model, &sample, spec).unwrap();
        let (logits, classes) = predict(&whole, &data, None).unwrap();
        assert_eq!(logits.len(), 37 * classes);
        let single = crate::exec::tract::Runner::new(&model, &sample, 1).unwrap();
        for i in [0, 8, 36] {
            let (y, _) = single.run(data.sample(i)).unwrap();
            for (a, b) in y.iter().zip(&logits[i * classes..(i + 1) * classes]) {
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
        let data = tiny_data(37, &sample, classes as u32);
        let report = evaluate(&model, "tiny", Some((&model, "tiny")), &data, spec, false).unwrap();
        assert_eq!(report.images, 37);
        let preds: Vec<usize> = logits.chunks(classes).map(argmax).collect();
        let want = preds.iter().zip(&data.labels).filter(|(p, l)| **p == **l as usize).count();
        assert_eq!(report.correct, want);
        let r = report.reference.unwrap();
        assert_eq!((r.agreement, r.max_abs_diff, r.accuracy), (1.0, 0.0, report.accuracy));
    }

    #[test]
    fn labels_out_of_range_and_wrong_shapes_are_data_errors() {
        let model = load_model(Path::new(TINY)).unwrap();
        let sample = crate::analysis::shapes::sample_shape(&model, None).unwrap();
        let mut data = tiny_data(4, &sample, 1);
        data.labels[2] = 10;
        let e = evaluate(&model, "tiny", None, &data, RunSpec::default(), false).unwrap_err();
        assert_eq!(crate::error::exit_code_of(&e), crate::error::ExitCode::InvalidData, "{e:#}");
        assert!(format!("{e:#}").contains("label 10 of image 2"), "{e:#}");
        let mut wrong = sample.clone();
        *wrong.last_mut().unwrap() += 4;
        let e = evaluate(
            &model,
            "tiny.onnx",
            None,
            &tiny_data(2, &wrong, 1),
            RunSpec::default(),
            false,
        )
        .unwrap_err();
        assert_eq!(crate::error::exit_code_of(&e), crate::error::ExitCode::InvalidData, "{e:#}");
        assert!(format!("{e:#}").contains("tiny.onnx expects"), "{e:#}");
    }

    #[test]
    fn fashion_mnist_when_installed() {
        let dir = Path::new(crate::data::DEFAULT_FASHION_MNIST_DIR);
        if !crate::prerequisite(dir.is_dir(), "Fashion-MNIST") {
            return;
        }
        let d = load("fashion-mnist", Split::Test, Some(100), &Normalisation::default()).unwrap();
        assert_eq!(d.sample_shape, vec![1, 28, 28]);
        assert_eq!(d.len(), 100);
        assert!(d.labels.iter().all(|&l| l < 10));
        assert!(d.images.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }
}
