//! `relucompile in.onnx -o out.onnx`: run a pipeline, check the result against the original
//! on real and random inputs, and write it only if it computes the same function.

use crate::analysis::census::{census, Census};
use crate::analysis::cost::{CostEstimate, CostModel};
use crate::analysis::shapes::sample_shape;
use crate::error::{exit_code_of, CompileError, ExitCode};
use crate::eval::compare::{compare_models_on, random_inputs, Comparison, LOSSLESS_REL_TOLERANCE};
use crate::eval::data;
use crate::frontend::{load_model, write_bytes_atomic};
use crate::ir::Model;
use crate::passes::{
    prepare, run_pipeline, PassContext, PassRecord, Pipeline, VerifyOptions, DEFAULT_PIPELINE,
};
use crate::report::{table, thousands};
use crate::search::{best_under_budget, parse_budget, Candidate};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The data set when --data is not given.
const DEFAULT_DATA: &str = data::FASHION_MNIST_SPEC;

/// Passes that always close a pipeline: emitted graphs never hold Identity or dead nodes.
const FINALIZE: &str = "identity-elim,dce";

/// Real images used by the differential check: enough to cover every class several times.
const CHECK_IMAGES: usize = 64;
/// Random inputs: they reach activations real images never do.
const CHECK_RANDOM: usize = 16;
const CHECK_SEED: u64 = 0x5EED;

#[derive(clap::Args, Debug)]
pub struct CompileArgs {
    /// The ONNX model to rewrite
    #[arg(required = true)]
    pub input: Option<PathBuf>,
    /// Where to write the rewritten model
    #[arg(short, long, required = true)]
    pub output: Option<PathBuf>,
    /// The pass pipeline, e.g. 'const-fold,fold-bn,dce' (see `relucompile passes`)
    #[arg(long, default_value = DEFAULT_PIPELINE)]
    pub passes: String,
    /// Input shape with batch, e.g. 1x3x32x32 (default: the model's declared shape)
    #[arg(long, value_parser = super::parse_shape)]
    pub input_shape: Option<::std::vec::Vec<usize>>,
    /// Verify the IR and compare outputs after every pass; names the first pass that breaks
    #[arg(long)]
    pub verify_each: bool,
    /// Allow the output path to be the input file
    #[arg(long)]
    pub force: bool,
    /// Real images for the output check (any --data format) [default: --data, else
    /// fashion-mnist]
    #[arg(long)]
    pub check_data: Option<String>,
    /// Remove every ReLU of these stages (lossy; stage numbers as `inspect` shows, 0 = stem)
    #[arg(long, value_delimiter = ',', help_heading = "ReLU reduction (lossy)")]
    pub cull: Vec<usize>,
    /// Thin the kept stages: drop the ReLU after each residual add (bottom), after each
    /// block's first conv (top), or every other ReLU layer of a plain chain (alternate)
    #[arg(long, value_enum, help_heading = "ReLU reduction (lossy)")]
    pub thin: Option<ThinMode>,
    /// Limit --thin to these stages
    #[arg(long, value_delimiter = ',', requires = "thin", help_heading = "ReLU reduction (lossy)")]
    pub thin_stages: Vec<usize>,
    /// Per-channel ReLU reduction: channels whose input is positive (or negative) on at least
    /// this fraction of calibration images become identity (or zero)
    #[arg(long, help_heading = "ReLU reduction (lossy)")]
    pub channel_threshold: Option<f64>,
    /// Run the network on its input downsampled by this factor per side (0.5, 0.25, ...):
    /// ReLUs and MACs fall by its square (DeepReDuce's resolution knob)
    #[arg(long, value_name = "FACTOR", help_heading = "ReLU reduction (lossy)")]
    pub resolution: Option<f64>,
    /// Keep this fraction of the channels of every channel group (DeepReDuce's width knob):
    /// ReLUs fall by the fraction, MACs by about its square
    #[arg(long, value_name = "FRACTION", help_heading = "ReLU reduction (lossy)")]
    pub width: Option<f64>,
    /// Replace every MaxPool by an AveragePool of the same window: secure max-pooling is a
    /// tree of comparisons, averaging is linear
    #[arg(long, help_heading = "ReLU reduction (lossy)")]
    pub avg_pool: bool,
    /// Calibration images for --channel-threshold and --relu-budget, drawn from the training
    /// split of --data
    #[arg(long, default_value_t = 512, help_heading = "ReLU reduction (lossy)")]
    pub calibration_images: usize,
    /// Seed of the calibration draw (the same as `pareto --seed` reproduces its points)
    #[arg(long, default_value_t = 0, help_heading = "ReLU reduction (lossy)")]
    pub seed: u64,
    /// Pick the culling/thinning/channel combination that meets this ReLU budget (a count or
    /// a percentage like 25%) with the least accuracy loss on calibration images
    #[arg(long, help_heading = "ReLU reduction (lossy)", conflicts_with_all = ["cull", "thin", "channel_threshold"])]
    pub relu_budget: Option<String>,
    /// With --relu-budget: take the most accurate point under the budget from a frontier that
    /// `relucompile pareto` wrote (its directory or frontier.json) instead of searching
    #[arg(long, requires = "relu_budget", help_heading = "ReLU reduction (lossy)")]
    pub frontier: Option<PathBuf>,
    /// Do not recalibrate after lossy passes (by default every Conv/Gemm output channel is
    /// mapped to the original's mean and scale on calibration images, folded into the weights)
    #[arg(long, help_heading = "ReLU reduction (lossy)")]
    pub no_recalibrate: bool,
    /// Data to measure accuracy on (test split; calibration uses the training split):
    /// `fashion-mnist`, an IDX, CIFAR or image-folder directory, or a .npy file. Lossy
    /// pipelines are always measured (default `fashion-mnist`) unless --no-eval
    #[arg(long, help_heading = "Accuracy gate")]
    pub data: Option<String>,
    /// Write a lossy rewrite without measuring its accuracy (when no labelled data fits the
    /// model; implies --no-recalibrate); the report warns that accuracy was not measured.
    /// --max-drop cannot run then
    #[arg(long, help_heading = "Accuracy gate")]
    pub no_eval: bool,
    /// Fail (exit 7, nothing written) when accuracy falls by more than this many points
    #[arg(long, help_heading = "Accuracy gate")]
    pub max_drop: Option<f64>,
    /// Evaluate on the first N test images only
    #[arg(long, help_heading = "Accuracy gate")]
    pub limit: Option<usize>,
    /// Estimate private-inference cost with this model: `crypten` (built in) or a JSON file
    #[arg(long, default_value = "crypten")]
    pub cost_model: String,
    /// Write the report as JSON to this file
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print the report as JSON on stdout instead of tables
    #[arg(long)]
    pub json: bool,
    /// No progress bars
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub data_flags: super::data_flags::DataFlags,
    #[command(flatten)]
    pub finetune: super::finetune::FinetuneFlags,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ThinMode {
    Bottom,
    Top,
    Alternate,
}

#[derive(Serialize)]
struct AccuracyReport {
    data: String,
    images: usize,
    before: f64,
    after: f64,
    /// Percentage points lost.
    drop_points: f64,
    /// Fraction of images where both graphs predict the same class.
    agreement: f64,
    max_drop: Option<f64>,
    passed: bool,
    /// Set when accuracy fell by more than [`LOUD_DROP_POINTS`] and no gate was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
}

/// A lossy compile that loses more than this many points without `--max-drop` is reported
/// loudly: it is most likely a broken network rather than an intended trade.
const LOUD_DROP_POINTS: f64 = 5.0;

#[derive(Serialize)]
struct CompileReport {
    input: String,
    output: String,
    pipeline: String,
    passes: Vec<PassRecord>,
    before: CensusSummary,
    after: CensusSummary,
    /// Outputs compared on real images (absent when none fit the model).
    check_real: Option<Comparison>,
    check_random: Comparison,
    check_tolerance: f32,
    /// Whether the pipeline holds lossy passes (then accuracy, not output equality, decides).
    lossy: bool,
    accuracy: Option<AccuracyReport>,
    /// Estimated private-inference cost of both graphs, per layer and in total.
    cost_before: CostEstimate,
    cost_after: CostEstimate,
    /// With --finetune-epochs: the fine-tuning run (the accuracy above is the tuned graph's).
    #[serde(skip_serializing_if = "Option::is_none")]
    finetune: Option<super::finetune::FinetuneReport>,
    /// With --relu-budget: the budget, the choice and every candidate considered.
    #[serde(skip_serializing_if = "Option::is_none")]
    budget: Option<BudgetReport>,
    /// With --no-eval on a lossy pipeline: the warning that accuracy was not measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy_not_measured: Option<String>,
}

#[derive(Serialize)]
struct BudgetReport {
    relus: u64,
    chosen: Candidate,
    candidates: Vec<Candidate>,
}

#[derive(Serialize)]
struct CensusSummary {
    total_relus: u64,
    total_macs: u64,
    nodes: usize,
    stages: Vec<u64>,
}

fn summary(model: &Model, c: &Census) -> CensusSummary {
    CensusSummary {
        total_relus: c.total_relus,
        total_macs: c.total_macs,
        nodes: model.graph.nodes.len(),
        stages: c.stages.iter().map(|s| s.relus).collect(),
    }
}

pub fn run(args: &CompileArgs) -> Result<()> {
    let input = args.input.as_deref().context("no input model given")?;
    let output = args.output.as_deref().context("no output path given (-o out.onnx)")?;
    check_output_path(input, output, args.force)?;
    let original = load_model(input)?;
    let sample = sample_shape(&original, args.input_shape.as_deref())?;
    let before =
        census(&original, &sample).with_context(|| format!("in model {}", input.display()))?;
    let cost_model = CostModel::load(&args.cost_model)?;
    let budget = args.relu_budget.as_ref().map(|_| budget_relus(args, &before)).transpose()?;
    let budget_choice = match budget {
        Some(relus) => Some(choose_for_budget(&original, &sample, relus, args)?),
        None => None,
    };
    let pipeline = Pipeline::parse(&format!(
        "{},{FINALIZE}",
        pipeline_text(args, budget_choice.as_ref().map(|(c, _)| c.pipeline.as_str()))
    ))?;
    let lossy = pipeline.steps.iter().any(|(_, _, p)| !p.lossless());
    // The test images are read before any pass runs: data that does not fit fails fast.
    let test_set = test_set(&original, &sample, lossy, args)?;

    let check_spec = args.check_data.as_deref().or(args.data.as_deref()).unwrap_or(DEFAULT_DATA);
    let (real, real_note) = real_check_inputs(&original, &sample, check_spec, args);
    let random = random_inputs(CHECK_RANDOM * sample.iter().product::<usize>(), CHECK_SEED);
    let verify = VerifyOptions {
        structure: args.verify_each,
        outputs: args.verify_each.then(|| random.clone()),
    };
    let mut model = original.clone();
    let mut ctx = PassContext::new(sample.clone());
    let data_driven = ["channel-thin", "recalibrate"];
    if pipeline.steps.iter().any(|(name, _, _)| data_driven.contains(&name.as_str())) {
        let images = Arc::new(calibration_set(&original, &sample, args)?.images);
        ctx = PassContext::with_data(sample.clone(), images, &prepare(&original, &ctx)?);
    }
    let records = run_pipeline(&mut model, &pipeline, &ctx, &verify)?;
    let finetune = if args.finetune.finetune_epochs > 0 {
        if !lossy {
            return Err(CompileError::new(
                ExitCode::Usage,
                "--finetune-epochs needs a lossy pipeline: a lossless one computes the original already",
            )
            .into());
        }
        let (tuned, report) = super::finetune::finetune_model(
            &model,
            &original,
            (args.data.as_deref().unwrap_or(DEFAULT_DATA), &args.data_flags),
            &args.finetune.train_flags(),
            args.finetune.finetune_epochs,
            args.limit,
            !args.json && !args.no_progress,
        )?;
        model = tuned;
        Some(report)
    } else {
        None
    };
    let after = census(&model, &sample)?;

    let mut sets: Vec<&[f32]> = vec![&random];
    sets.extend(real.as_deref());
    let mut checks = compare_models_on(&original, &model, &sample, &sets)
        .with_context(|| format!("running {} and its rewrite", input.display()))?
        .into_iter();
    let check_random = checks.next().context("the random-input comparison")?;
    let check_real = checks.next();
    let accuracy = match &test_set {
        Some(set) => Some(measure_accuracy(&original, &model, set, args)?),
        None => None,
    };
    let accuracy_not_measured = (lossy && accuracy.is_none()).then(|| {
        format!(
            "the accuracy of {} was not measured (--no-eval), nor was it recalibrated: the lossy \
             pipeline changes the network's predictions by an unknown amount",
            output.display()
        )
    });
    let report = CompileReport {
        input: input.display().to_string(),
        output: output.display().to_string(),
        pipeline: pipeline.text(),
        passes: records,
        before: summary(&original, &before),
        after: summary(&model, &after),
        check_real,
        check_random,
        check_tolerance: LOSSLESS_REL_TOLERANCE,
        lossy,
        accuracy,
        cost_before: cost_model.estimate(&before),
        cost_after: cost_model.estimate(&after),
        finetune,
        budget: budget.zip(budget_choice).map(|(relus, (chosen, candidates))| BudgetReport {
            relus,
            chosen,
            candidates,
        }),
        accuracy_not_measured,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &before, &after, &real_note);
    }
    if let Some(path) = &args.report {
        write_bytes_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if let Some(warning) = report.accuracy.as_ref().and_then(|a| a.warning.as_ref()) {
        eprintln!("WARNING: {warning}");
    }
    if let Some(warning) = &report.accuracy_not_measured {
        eprintln!("warning: {warning}");
    }
    if let Some(acc) = report.accuracy.as_ref().filter(|a| !a.passed) {
        return Err(CompileError::new(
            ExitCode::AccuracyGate,
            format!(
                "accuracy fell by {:.2} points ({:.2}% -> {:.2}%), more than --max-drop {}; {} was not written",
                acc.drop_points,
                100.0 * acc.before,
                100.0 * acc.after,
                acc.max_drop.unwrap_or(f64::NAN),
                output.display()
            ),
        )
        .into());
    }
    let checks = std::iter::once(&report.check_random).chain(report.check_real.as_ref());
    let mismatch = checks.into_iter().find(|c| !c.within(LOSSLESS_REL_TOLERANCE));
    if let Some(bad) = mismatch.filter(|_| !lossy) {
        return Err(CompileError::new(
            ExitCode::OutputMismatch,
            format!(
                "the rewritten graph's outputs differ from the original's by up to {:.3e} \
                 (tolerance {:.0e} relative); {} was not written. Rerun with --verify-each \
                 to find the pass at fault",
                bad.max_abs_diff,
                LOSSLESS_REL_TOLERANCE,
                output.display()
            ),
        )
        .into());
    }
    crate::frontend::write_model_atomic(output, &model)?;
    if !args.json {
        println!("wrote {}", output.display());
    }
    Ok(())
}

/// The pipeline text: `--passes`, with the lossy flags' passes placed after BatchNorm folding
/// (so stage numbers are those `inspect` shows for the input) or first when there is none.
fn pipeline_text(args: &CompileArgs, searched: Option<&str>) -> String {
    let mut lossy: Vec<String> =
        searched.into_iter().filter(|s| !s.is_empty()).map(String::from).collect();
    let list = |v: &[usize]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    if !args.cull.is_empty() {
        lossy.push(format!("cull({})", list(&args.cull)));
    }
    if let Some(mode) = args.thin {
        let mode = format!("{mode:?}").to_lowercase();
        if args.thin_stages.is_empty() {
            lossy.push(format!("thin({mode})"));
        } else {
            lossy.push(format!("thin({mode},{})", list(&args.thin_stages)));
        }
    }
    if let Some(t) = args.channel_threshold {
        lossy.push(format!("channel-thin({t})"));
    }
    if let Some(f) = args.resolution {
        lossy.push(format!("resolution({f})"));
    }
    if let Some(f) = args.width {
        lossy.push(format!("width({f})"));
    }
    if args.avg_pool {
        lossy.push("maxpool-to-avgpool".into());
    }
    if lossy.is_empty() {
        return args.passes.clone();
    }
    // Recalibration needs calibration images, which --no-eval (for when none fit) goes without.
    if !args.no_recalibrate && !args.no_eval {
        lossy.push("recalibrate".into());
    }
    crate::passes::place_lossy(&args.passes, &lossy)
}

fn budget_relus(args: &CompileArgs, before: &Census) -> Result<u64> {
    let text = args.relu_budget.as_deref().unwrap_or_default();
    parse_budget(text, before.total_relus)
        .map_err(|e| CompileError::new(ExitCode::Usage, format!("--relu-budget: {e}")).into())
}

/// Search the lossy configurations for the best one under `--relu-budget`, on calibration
/// images from the training split. The lossless passes before the lossy ones run first.
fn choose_for_budget(
    original: &Model,
    sample: &[usize],
    budget: u64,
    args: &CompileArgs,
) -> Result<(Candidate, Vec<Candidate>)> {
    if let Some(path) = &args.frontier {
        return choose_from_frontier(path, budget);
    }
    let calib = calibration_set(original, sample, args)?;
    let base = prepare(original, &PassContext::new(sample.to_vec()))?;
    let mut ctx = PassContext::with_data(sample.to_vec(), Arc::new(calib.images.clone()), &base);
    if args.no_recalibrate {
        ctx.reference = None;
    }
    best_under_budget(&base, budget, &ctx, &calib, !args.json && !args.no_progress)
}

/// The most accurate point of a written frontier whose ReLU count fits the budget.
fn choose_from_frontier(path: &Path, budget: u64) -> Result<(Candidate, Vec<Candidate>)> {
    let file = if path.is_dir() { path.join("frontier.json") } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read the frontier {}", file.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a frontier.json", file.display()))?;
    let points: Vec<Candidate> = v["points"]
        .as_array()
        .with_context(|| format!("{} has no points", file.display()))?
        .iter()
        .filter_map(|p| {
            let config = p["config"].as_str()?;
            Some(Candidate {
                pipeline: if config == "original" { String::new() } else { config.to_string() },
                relus: p["relus"].as_u64()?,
                calibration_accuracy: p["accuracy"].as_f64(),
            })
        })
        .collect();
    let best = points
        .iter()
        .filter(|p| p.relus <= budget)
        .max_by(|a, b| {
            a.calibration_accuracy.unwrap_or(0.0).total_cmp(&b.calibration_accuracy.unwrap_or(0.0))
        })
        .cloned()
        .ok_or_else(|| {
            CompileError::new(
                ExitCode::Usage,
                format!("no point of {} has at most {budget} ReLUs", file.display()),
            )
        })?;
    Ok((best, points))
}

/// The seeded draw is the one `pareto` makes, so a frontier point's channel decisions are
/// reproduced exactly when its seed and count are used.
fn calibration_set(
    original: &Model,
    sample: &[usize],
    args: &CompileArgs,
) -> Result<data::Dataset> {
    let (count, seed) = match &args.frontier {
        Some(path) => frontier_calibration(path)?,
        None => (args.calibration_images, args.seed),
    };
    let spec = args.data.as_deref().unwrap_or(DEFAULT_DATA);
    let train = args
        .data_flags
        .load(spec, data::Split::Train, None, original, sample, &input_name(args))
        .map_err(|e| {
            no_fitting_data(e, "gather calibration statistics from the training split", false)
        })?;
    Ok(train.seeded_subset(count, seed))
}

/// The calibration count and seed a frontier was searched with.
fn frontier_calibration(path: &Path) -> Result<(usize, u64)> {
    let file = if path.is_dir() { path.join("frontier.json") } else { path.to_path_buf() };
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?,
    )
    .with_context(|| format!("{} is not a frontier.json", file.display()))?;
    match (v["calibration_images"].as_u64(), v["seed"].as_u64()) {
        (Some(n), Some(seed)) => Ok((n as usize, seed)),
        _ => Err(CompileError::new(
            ExitCode::Usage,
            format!("{} lacks calibration_images or seed", file.display()),
        )
        .into()),
    }
}

/// The test split of `--data` when accuracy is to be measured: always for a lossy pipeline
/// (unless --no-eval), and whenever --data or --max-drop asks. Data that cannot be read or
/// does not fit the model is an error naming --data and --no-eval.
fn test_set(
    original: &Model,
    sample: &[usize],
    lossy: bool,
    args: &CompileArgs,
) -> Result<Option<data::Dataset>> {
    if args.no_eval {
        if args.max_drop.is_some() {
            return Err(CompileError::new(
                ExitCode::Usage,
                "--max-drop gates on the measured accuracy, but --no-eval skips measuring it: \
                 the gate cannot run; drop one of them",
            )
            .into());
        }
        return Ok(None);
    }
    if !(lossy || args.data.is_some() || args.max_drop.is_some()) {
        return Ok(None);
    }
    let spec = args.data.as_deref().unwrap_or(DEFAULT_DATA);
    let what =
        if lossy { "measure the accuracy of this lossy rewrite" } else { "measure accuracy" };
    args.data_flags
        .load(spec, data::Split::Test, args.limit, original, sample, &input_name(args))
        .map(Some)
        .map_err(|e| no_fitting_data(e, what, true))
}

/// A data error, restated as what it prevents and what to give instead.
fn no_fitting_data(e: anyhow::Error, what: &str, no_eval: bool) -> anyhow::Error {
    if exit_code_of(&e) != ExitCode::InvalidData {
        return e;
    }
    CompileError::invalid_data(format!(
        "cannot {what}: {e:#}\n  give --data with labelled images that fit the model ({}){}",
        data::FORMATS,
        if no_eval {
            ", or --no-eval to write the result without measuring its accuracy"
        } else {
            ""
        }
    ))
    .into()
}

fn input_name(args: &CompileArgs) -> String {
    args.input.as_ref().map_or_else(|| "the model".into(), |p| p.display().to_string())
}

/// Accuracy of the original and the rewritten graph on the test split, in one pass each.
fn measure_accuracy(
    original: &Model,
    model: &Model,
    set: &data::Dataset,
    args: &CompileArgs,
) -> Result<AccuracyReport> {
    let name = input_name(args);
    let eval = crate::eval::evaluator::evaluate(
        model,
        "rewritten",
        Some((original, &name)),
        set,
        crate::eval::evaluator::DEFAULT_BATCH,
        !args.json && !args.no_progress,
    )?;
    let reference = eval.reference.as_ref().context("the evaluator returned no reference")?;
    let drop_points = 100.0 * (reference.accuracy - eval.accuracy);
    Ok(AccuracyReport {
        data: set.source.clone(),
        images: eval.images,
        before: reference.accuracy,
        after: eval.accuracy,
        drop_points,
        agreement: reference.agreement,
        max_drop: args.max_drop,
        passed: args.max_drop.is_none_or(|m| drop_points <= m),
        warning: (args.max_drop.is_none() && drop_points > LOUD_DROP_POINTS).then(|| {
            format!(
                "accuracy fell by {drop_points:.2} points ({:.2}% -> {:.2}%) and no --max-drop \
                 gate was set; fine-tune the result (--finetune-epochs 2) or gate the build \
                 with --max-drop",
                100.0 * reference.accuracy,
                100.0 * eval.accuracy
            )
        }),
    })
}

/// Refuse to overwrite the input (unless forced) or to write into a directory.
pub(crate) fn check_output_path(input: &Path, output: &Path, force: bool) -> Result<()> {
    if output.is_dir() {
        return Err(CompileError::new(
            ExitCode::Usage,
            format!("output path {} is a directory; give a file name", output.display()),
        )
        .into());
    }
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same && !force {
        return Err(CompileError::new(
            ExitCode::Usage,
            format!("refusing to overwrite the input {} (use --force)", input.display()),
        )
        .into());
    }
    Ok(())
}

/// Real images for the check when the data set is there and fits the model; otherwise `None`
/// and a note saying why (random inputs are always used).
fn real_check_inputs(
    model: &Model,
    sample: &[usize],
    spec: &str,
    args: &CompileArgs,
) -> (Option<Vec<f32>>, String) {
    // As DataFlags::load, without its notes: these images only feed the output comparison.
    let fit = args.data_flags.fit(sample, "the model");
    let loaded = args.data_flags.normalisation(model).and_then(|norm| {
        data::load_fitted(spec, data::Split::Test, Some(CHECK_IMAGES), &norm, &fit)
    });
    match loaded {
        Ok((d, _)) if d.sample_shape == sample => {
            let note = format!("{} real images from {spec}", d.len());
            (Some(d.images), note)
        }
        Ok((d, _)) => (
            None,
            format!(
                "real images from {spec} are {}, the model takes {}: random only",
                data::shape_text(&d.sample_shape),
                data::shape_text(sample)
            ),
        ),
        Err(e) => (None, format!("no real images ({e:#}): random only")),
    }
}

fn print_report(r: &CompileReport, before: &Census, after: &Census, real_note: &str) {
    println!("{} -> {}", r.input, r.output);
    println!("pipeline: {}\n", r.pipeline);
    if let Some(b) = &r.budget {
        println!(
            "budget {} ReLUs: chose '{}' ({} ReLUs, {:.2}% on calibration images) among {} candidates\n",
            thousands(b.relus),
            b.chosen.pipeline,
            thousands(b.chosen.relus),
            100.0 * b.chosen.calibration_accuracy.unwrap_or(f64::NAN),
            b.candidates.len()
        );
    }
    let rows: Vec<Vec<String>> = r
        .passes
        .iter()
        .map(|p| vec![p.pass.clone(), p.rewrites.to_string(), p.nodes_after.to_string()])
        .collect();
    print!("{}", table(&["pass", "rewrites", "nodes after"], &rows));
    let stages = before.stages.len().max(after.stages.len());
    let mut rows: Vec<Vec<String>> = (0..stages)
        .map(|i| {
            let get = |c: &Census| c.stages.get(i).map(|s| thousands(s.relus)).unwrap_or_default();
            vec![format!("stage {i}"), get(before), get(after)]
        })
        .collect();
    rows.push(vec![
        "total ReLUs".into(),
        thousands(before.total_relus),
        thousands(after.total_relus),
    ]);
    rows.push(vec!["MACs".into(), thousands(before.total_macs), thousands(after.total_macs)]);
    rows.push(vec!["nodes".into(), r.before.nodes.to_string(), r.after.nodes.to_string()]);
    let (cb, ca) = (&r.cost_before, &r.cost_after);
    rows.push(vec![
        "est. PI latency (s)".into(),
        format!("{:.3}", cb.seconds),
        format!("{:.3}", ca.seconds),
    ]);
    rows.push(vec![
        "est. PI MB sent".into(),
        format!("{:.2}", cb.bytes / 1e6),
        format!("{:.2}", ca.bytes / 1e6),
    ]);
    rows.push(vec![
        "est. PI rounds".into(),
        format!("{:.0}", cb.rounds),
        format!("{:.0}", ca.rounds),
    ]);
    println!();
    print!("{}", table(&["", "before", "after"], &rows));
    println!();
    let show = |what: &str, c: &Comparison| {
        println!(
            "check on {} {what}: max |diff| {:.3e} (largest output {:.3}), arg-max agreement {:.1}%",
            c.samples,
            c.max_abs_diff,
            c.max_abs_output,
            100.0 * c.argmax_agreement
        )
    };
    match &r.check_real {
        Some(c) => show("real images", c),
        None => println!("check: {real_note}"),
    }
    show("random inputs", &r.check_random);
    if let Some(a) = &r.accuracy {
        println!(
            "accuracy on {} images of {}: {:.2}% -> {:.2}% ({:+.2} points), agreement {:.2}%{}",
            a.images,
            a.data,
            100.0 * a.before,
            100.0 * a.after,
            -a.drop_points,
            100.0 * a.agreement,
            match a.max_drop {
                Some(m) if a.passed => format!(" [gate --max-drop {m}: passed]"),
                Some(m) => format!(" [gate --max-drop {m}: FAILED]"),
                None => String::new(),
            }
        );
    }
}
