//! Compile a model (`relucompile in.onnx -o out.onnx`): run a pipeline, check the result
//! against the original on real and random inputs and, for lossy pipelines, measure both
//! accuracies; [`Compilation::write`] writes it only if it computes the same function (or
//! passed the accuracy gate).

use super::context::RunData;
use super::finetune::{finetune_model, FinetuneReport};
use super::pareto::Frontier;
use super::{check_output_path, DataOptions, TrainOptions, DEFAULT_DATA};
use crate::analysis::census::{census, Census};
use crate::analysis::cost::{CostEstimate, CostModel};
use crate::analysis::shapes::sample_shape;
use crate::data;
use crate::data::random_inputs;
use crate::error::{exit_code_of, CompileError, ExitCode};
use crate::eval::compare::{compare_models_on, Comparison, LOSSLESS_REL_TOLERANCE};
use crate::eval::evaluator::Reference;
use crate::frontend::load_model;
use crate::ir::Model;
use crate::passes::{
    run_pipeline, Needs, PassContext, PassRecord, Pipeline, Step, VerifyOptions, DEFAULT_PIPELINE,
};
use crate::search::objective::{Budget, Cost, Objective};
use crate::search::probe::{ensure_probe_images, probe_set, Prober};
use crate::search::{best_under_budget, BudgetScoring, Candidate};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Passes that always close a pipeline: emitted graphs never hold Identity or dead nodes.
const FINALIZE: &str = "identity-elim,dce";

/// Real images used by the differential check: enough to cover every class several times.
const CHECK_IMAGES: usize = 64;
/// Random inputs: they reach activations real images never do.
const CHECK_RANDOM: usize = 16;
const CHECK_SEED: u64 = 0x5EED;

/// A compile: the input, the output and the pipeline that rewrites one into the other. Start
/// from [`CompileOptions::new`] (the lossless default pipeline) and set what differs.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The ONNX model to rewrite.
    pub input: PathBuf,
    /// Where [`Compilation::write`] writes the rewritten model.
    pub output: PathBuf,
    /// The pass pipeline (see `relucompile passes`); the lossy options' passes are placed in
    /// it after BatchNorm folding.
    pub passes: String,
    /// Input shape with batch (`None`: the model's declared shape).
    pub input_shape: Option<Vec<usize>>,
    /// Verify the IR and compare outputs after every pass, naming the first that breaks.
    pub verify_each: bool,
    /// Allow the output path to be the input file.
    pub force: bool,
    /// Real images for the output check (`None`: `data`, else Fashion-MNIST).
    pub check_data: Option<String>,
    /// Remove every ReLU of these stages (stage numbers as `inspect` shows, 0 = stem).
    pub cull: Vec<usize>,
    /// Thin the kept stages.
    pub thin: Option<ThinMode>,
    /// Limit `thin` to these stages (empty: all).
    pub thin_stages: Vec<usize>,
    /// Per-channel ReLU reduction threshold (`channel-thin`).
    pub channel_threshold: Option<f64>,
    /// Run the network on its input downsampled by this factor per side.
    pub resolution: Option<f64>,
    /// Keep this fraction of the channels of every channel group.
    pub width: Option<f64>,
    /// Replace every MaxPool by an AveragePool of the same window.
    pub avg_pool: bool,
    /// Calibration images, drawn from the training split of `data`.
    pub calibration_images: usize,
    /// Seed of the calibration draw.
    pub seed: u64,
    /// Search the lossy configuration that meets this ReLU budget (a count or `25%`) instead of
    /// taking `cull`/`thin`/`channel_threshold`.
    pub relu_budget: Option<String>,
    /// Search the lossy configuration (max-pool replacement included) whose estimated PI bytes
    /// per image meet this budget (`30MB`, `25%`); exclusive with the other budgets.
    pub bytes_budget: Option<String>,
    /// The same for estimated PI latency per image (`0.3s`, `300ms`, `25%`).
    pub latency_budget: Option<String>,
    /// With a budget: choose from the frontier `pareto` wrote here instead of searching.
    pub frontier: Option<PathBuf>,
    /// Recalibrate after lossy passes (refit every Conv/Gemm by least squares to the
    /// original's output on calibration images).
    pub recalibrate: bool,
    /// Data to measure accuracy on (test split; calibration uses the training split). `None`:
    /// Fashion-MNIST, measured only for lossy pipelines or with `max_drop`.
    pub data: Option<String>,
    /// Measure accuracy (and recalibrate); `false` writes a lossy rewrite unmeasured.
    pub evaluate: bool,
    /// The accuracy gate: [`Compilation::write`] fails (exit 7) when accuracy falls by more
    /// than this many points.
    pub max_drop: Option<f64>,
    /// Evaluate on the first N test images only.
    pub limit: Option<usize>,
    /// The PI cost model: `crypten` or a JSON file.
    pub cost_model: String,
    /// Show progress bars on stderr.
    pub progress: bool,
    pub data_options: DataOptions,
    /// Fine-tune the reduced graph with the original as teacher (lossy pipelines only).
    pub finetune: Option<TrainOptions>,
    /// With a budget: rank the best candidates again after a one-epoch distillation on this
    /// many training images (`crate::search::probe`; 0: by their accuracy after the refit).
    pub probe_images: usize,
    /// With a budget: also score the candidates that another under the budget dominates
    /// (keeps all their ReLUs and more), which are skipped by default.
    pub score_dominated: bool,
}

impl CompileOptions {
    /// Compile `input` to `output` with the default lossless pipeline.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        CompileOptions { input: input.into(), output: output.into(), ..Default::default() }
    }
}

impl Default for CompileOptions {
    /// The command line's defaults, with empty paths.
    fn default() -> Self {
        CompileOptions {
            input: PathBuf::new(),
            output: PathBuf::new(),
            passes: DEFAULT_PIPELINE.into(),
            input_shape: None,
            verify_each: false,
            force: false,
            check_data: None,
            cull: vec![],
            thin: None,
            thin_stages: vec![],
            channel_threshold: None,
            resolution: None,
            width: None,
            avg_pool: false,
            calibration_images: 1024,
            seed: 0,
            relu_budget: None,
            bytes_budget: None,
            latency_budget: None,
            frontier: None,
            recalibrate: true,
            data: None,
            evaluate: true,
            max_drop: None,
            limit: None,
            cost_model: "crypten".into(),
            progress: false,
            data_options: DataOptions::default(),
            finetune: None,
            probe_images: 0,
            score_dominated: false,
        }
    }
}

/// Which ReLUs `thin` drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinMode {
    /// The ReLU after each residual add.
    Bottom,
    /// The ReLU after each block's first conv.
    Top,
    /// Every other ReLU layer of a plain chain.
    Alternate,
}

impl ThinMode {
    pub fn name(self) -> &'static str {
        match self {
            ThinMode::Bottom => "bottom",
            ThinMode::Top => "top",
            ThinMode::Alternate => "alternate",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AccuracyReport {
    pub data: String,
    pub images: usize,
    pub before: f64,
    pub after: f64,
    /// Percentage points lost.
    pub drop_points: f64,
    /// Fraction of images where both graphs predict the same class.
    pub agreement: f64,
    pub max_drop: Option<f64>,
    pub passed: bool,
    /// How pixels became both graphs' inputs, and what states it.
    pub normalisation: data::Normalisation,
    /// Set when accuracy fell by more than [`LOUD_DROP_POINTS`] and no gate was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// A lossy compile that loses more than this many points without `--max-drop` is reported
/// loudly: it is most likely a broken network rather than an intended trade.
const LOUD_DROP_POINTS: f64 = 5.0;

#[derive(Debug, Clone, Serialize)]
pub struct CompileReport {
    pub input: String,
    pub output: String,
    pub pipeline: String,
    pub passes: Vec<PassRecord>,
    pub before: CensusSummary,
    pub after: CensusSummary,
    /// Outputs compared on real images (absent when none fit the model).
    pub check_real: Option<Comparison>,
    pub check_random: Comparison,
    pub check_tolerance: f32,
    /// Whether the pipeline holds lossy passes (then accuracy, not output equality, decides).
    pub lossy: bool,
    pub accuracy: Option<AccuracyReport>,
    /// Estimated private-inference cost of both graphs, per layer and in total.
    pub cost_before: CostEstimate,
    pub cost_after: CostEstimate,
    /// With --finetune-epochs: the fine-tuning run (the accuracy above is the tuned graph's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneReport>,
    /// With a budget: the budget, the choice and every candidate considered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetReport>,
    /// With --no-eval on a lossy pipeline: the warning that accuracy was not measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_not_measured: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetReport {
    pub objective: Objective,
    /// In the objective's unit: ReLUs, bytes or seconds per image.
    pub limit: f64,
    /// The limit of a ReLU budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relus: Option<u64>,
    pub chosen: Candidate,
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CensusSummary {
    pub total_relus: u64,
    pub total_macs: u64,
    pub nodes: usize,
    pub stages: Vec<u64>,
}

fn summary(model: &Model, c: &Census) -> CensusSummary {
    CensusSummary {
        total_relus: c.total_relus,
        total_macs: c.total_macs,
        nodes: model.graph.nodes.len(),
        stages: c.stages.iter().map(|s| s.relus).collect(),
    }
}

/// A compiled model, not yet written: its report, the rewritten graph and what printing the
/// report needs beyond its JSON.
#[derive(Debug, Clone)]
pub struct Compilation {
    pub report: CompileReport,
    pub model: Model,
    pub census_before: Census,
    pub census_after: Census,
    /// Why the check ran on random inputs only, or which real images it used.
    pub check_note: String,
    output: PathBuf,
}

impl Compilation {
    /// `Ok` when the result may be written: the accuracy gate passed (else exit 7) and, for a
    /// lossless pipeline, the outputs matched the original's (else exit 5).
    pub fn verdict(&self) -> Result<()> {
        let (report, output) = (&self.report, &self.output);
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
        if let Some(bad) = mismatch.filter(|_| !report.lossy) {
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
        Ok(())
    }

    /// Write the rewritten model to the options' output (atomically) if [`Self::verdict`]
    /// allows it; nothing is written otherwise.
    pub fn write(&self) -> Result<()> {
        self.verdict()?;
        crate::frontend::write_model_atomic(&self.output, &self.model)
    }

    /// Where [`Self::write`] writes.
    pub fn output(&self) -> &Path {
        &self.output
    }
}

/// Run the pipeline `opts` describes on `opts.input` and check the result: the census before
/// and after, outputs compared on real and random inputs, accuracy measured (lossy pipelines,
/// or when data or a gate is asked for), fine-tuning when asked. Nothing is written: see
/// [`Compilation::write`].
pub fn compile(opts: &CompileOptions) -> Result<Compilation> {
    let (input, output) = (opts.input.as_path(), opts.output.as_path());
    check_output_path(input, output, opts.force)?;
    let original = load_model(input)?;
    let sample = sample_shape(&original, opts.input_shape.as_deref())?;
    let before =
        census(&original, &sample).with_context(|| format!("in model {}", input.display()))?;
    let cost_model = CostModel::load(&opts.cost_model)?;
    let budget = budget_of(opts, &Cost::from_census(&before, &cost_model))?;
    let spec = opts.data.as_deref().unwrap_or(DEFAULT_DATA);
    let run = RunData::new(
        original.clone(),
        sample.clone(),
        input_name(opts),
        (spec, &opts.data_options),
        opts.limit,
    );
    // The original is measured before any search or pass runs: an unstated normalisation or
    // an original near chance stops here (exit 8), as does data that does not fit.
    let flag_steps = pipeline_steps(opts, None)?;
    let lossy_flags = flag_steps.iter().any(|s| !s.pass.lossless);
    if test_set(&run, lossy_flags || budget.is_some(), opts)?.is_some() {
        if lossy_flags {
            rehearse(&original, &sample, flag_steps)?;
        }
        run.original_on_test(opts.progress)?;
    }
    let budget_choice = match &budget {
        Some(b) => Some(choose_for_budget(&run, b, &cost_model, opts)?),
        None => None,
    };
    let mut steps = pipeline_steps(opts, budget_choice.as_ref().map(|(c, _)| c.pipeline.as_str()))?;
    steps.extend(Step::parse_list(FINALIZE)?);
    let pipeline = Pipeline::new(steps)?;
    let lossy = pipeline.lossy();
    // The test images are read before any pass runs: data that does not fit fails fast.
    let test_set = test_set(&run, lossy, opts)?;

    let check_spec = opts.check_data.as_deref().or(opts.data.as_deref()).unwrap_or(DEFAULT_DATA);
    let (real, check_note) = real_check_inputs(&run, check_spec, opts);
    let random = random_inputs(CHECK_RANDOM * sample.iter().product::<usize>(), CHECK_SEED);
    let verify = VerifyOptions {
        structure: opts.verify_each,
        outputs: opts.verify_each.then(|| random.clone()),
    };
    let (mut model, records, finetune) = rewrite(&run, &pipeline, &verify, opts)?;
    run.record_normalisation(&mut model);
    let after = census(&model, &sample)?;

    let mut sets: Vec<&[f32]> = vec![&random];
    sets.extend(real.as_deref());
    let mut checks = compare_models_on(&original, &model, &sample, &sets)
        .with_context(|| format!("running {} and its rewrite", input.display()))?
        .into_iter();
    let check_random = checks.next().context("the random-input comparison")?;
    let check_real = checks.next();
    let accuracy = match &test_set {
        Some(set) => Some(measure_accuracy(&run, &model, set, opts)?),
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
        budget: budget.zip(budget_choice).map(|(b, (chosen, candidates))| BudgetReport {
            objective: b.objective,
            limit: b.limit,
            relus: (b.objective == Objective::Relus).then_some(b.limit as u64),
            chosen,
            candidates,
        }),
        accuracy_not_measured,
    };
    Ok(Compilation {
        report,
        model,
        census_before: before,
        census_after: after,
        check_note,
        output: output.to_path_buf(),
    })
}

/// Run the steps up to the first that needs images on a copy of the graph, so that a flag the
/// graph cannot take (`--cull 9` on a 5-stage network) is refused at once rather than after
/// the original's evaluation (35 s on the shipped ResNet, minutes at width 64).
fn rehearse(original: &Model, sample: &[usize], steps: Vec<Step>) -> Result<()> {
    let graph_only = steps.into_iter().take_while(|s| s.pass.needs == Needs::Nothing).collect();
    let mut copy = original.clone();
    let ctx = PassContext::new(sample.to_vec());
    run_pipeline(&mut copy, &Pipeline::new(graph_only)?, &ctx, &VerifyOptions::default())?;
    Ok(())
}

/// The rewrite: the pipeline (on the calibration draw when a pass needs images), then the
/// distillation of `--finetune-epochs`.
fn rewrite(
    run: &RunData,
    pipeline: &Pipeline,
    verify: &VerifyOptions,
    opts: &CompileOptions,
) -> Result<(Model, Vec<PassRecord>, Option<FinetuneReport>)> {
    if opts.finetune.is_some() && !pipeline.lossy() {
        return Err(CompileError::new(
            ExitCode::Usage,
            "--finetune-epochs needs a lossy pipeline: a lossless one computes the original already",
        )
        .into());
    }
    let mut model = run.original.clone();
    let records = {
        // Dropped before training: the refit's reference outputs of every layer on the
        // calibration images are the largest thing a wide network's compile holds.
        let mut ctx = PassContext::new(run.sample.clone());
        if pipeline.needs_calibration() {
            let draw = calibration_set(run, opts)?;
            ctx = PassContext::fitted_on(run.sample.clone(), &draw, &*run.prepared()?).0;
        }
        run_pipeline(&mut model, pipeline, &ctx, verify)?
    };
    let finetune = match &opts.finetune {
        Some(training) => {
            // A pipeline that ends refitted (on all the calibration images) is where training
            // starts: the fine-tuner's own refit would redo it on fewer images.
            let mut training = training.clone();
            training.recipe.recalibrate &= !pipeline.ends_refitted();
            let (tuned, report) = finetune_model(&model, run, &training, opts.progress)?;
            model = tuned;
            Some(report)
        }
        None => None,
    };
    Ok((model, records, finetune))
}

/// The pipeline: `--passes`, with the lossy flags' steps (and a searched budget's) placed by
/// phase ([`crate::passes::place_lossy`]).
fn pipeline_steps(opts: &CompileOptions, searched: Option<&str>) -> Result<Vec<Step>> {
    let base = Step::parse_list(&opts.passes)?;
    let mut lossy: Vec<Step> = match searched.filter(|s| !s.is_empty()) {
        Some(text) => Step::parse_list(text)?,
        None => Vec::new(),
    };
    if !opts.cull.is_empty() {
        lossy.push(Step::new("cull", &opts.cull)?);
    }
    if let Some(mode) = opts.thin {
        let stages = opts.thin_stages.iter().map(|s| s.to_string());
        lossy.push(Step::new("thin", std::iter::once(mode.name().to_string()).chain(stages))?);
    }
    if let Some(t) = opts.channel_threshold {
        lossy.push(Step::new("channel-thin", [t])?);
    }
    if let Some(f) = opts.resolution {
        lossy.push(Step::new("resolution", [f])?);
    }
    if let Some(f) = opts.width {
        lossy.push(Step::new("width", [f])?);
    }
    let avg_pool = Step::named("maxpool-to-avgpool")?;
    if opts.avg_pool && !lossy.contains(&avg_pool) {
        lossy.push(avg_pool);
    }
    if lossy.is_empty() {
        return Ok(base);
    }
    // Recalibration needs calibration images, which --no-eval (for when none fit) goes without.
    if opts.recalibrate && opts.evaluate {
        lossy.push(Step::named("recalibrate")?);
    }
    Ok(crate::passes::place_lossy(&base, &lossy))
}

/// The one budget asked for (`--relu-budget`, `--bytes-budget` or `--latency-budget`), if any.
fn budget_of(opts: &CompileOptions, original: &Cost) -> Result<Option<Budget>> {
    let asked: Vec<(Objective, &str, &String)> = [
        (Objective::Relus, "--relu-budget", &opts.relu_budget),
        (Objective::Bytes, "--bytes-budget", &opts.bytes_budget),
        (Objective::Latency, "--latency-budget", &opts.latency_budget),
    ]
    .into_iter()
    .filter_map(|(o, flag, v)| v.as_ref().map(|v| (o, flag, v)))
    .collect();
    match asked.as_slice() {
        [] => Ok(None),
        [(objective, flag, text)] => Budget::parse(*objective, text, original)
            .map(Some)
            .map_err(|e| CompileError::new(ExitCode::Usage, format!("{flag}: {e}")).into()),
        _ => {
            let flags: Vec<&str> = asked.iter().map(|(_, f, _)| *f).collect();
            Err(CompileError::new(
                ExitCode::Usage,
                format!("{} cannot be combined: give one budget", flags.join(" and ")),
            )
            .into())
        }
    }
}

/// Search the lossy configurations for the best one under the budget, on calibration images
/// from the training split. The lossless passes before the lossy ones run first.
fn choose_for_budget(
    run: &RunData,
    budget: &Budget,
    cost_model: &CostModel,
    opts: &CompileOptions,
) -> Result<(Candidate, Vec<Candidate>)> {
    if let Some(path) = &opts.frontier {
        return choose_from_frontier(path, budget);
    }
    let sample = run.sample.as_slice();
    let train = training_split(run)?;
    let drawn = train.seeded_subset(opts.calibration_images, opts.seed);
    let base = run.prepared()?;
    let (mut ctx, calib) = PassContext::fitted_on(sample.to_vec(), &drawn, &base);
    if !opts.recalibrate {
        ctx.reference = None;
    }
    let probes = probe_set(&train, drawn.len(), opts.probe_images, opts.seed);
    drop(train);
    let data = opts.data.as_deref().unwrap_or(DEFAULT_DATA);
    ensure_probe_images(&probes, opts.probe_images, drawn.len(), data)?;
    let prober = Prober {
        base: &base,
        ctx: &ctx,
        train: &probes,
        score: &calib,
        recipe: opts.finetune.as_ref().map(|t| t.recipe.clone()).unwrap_or_default(),
        journal: None,
        progress: opts.progress,
    };
    let prober = (opts.probe_images > 0).then_some(&prober);
    let scoring = BudgetScoring {
        calibration: &calib,
        prober,
        score_dominated: opts.score_dominated,
        progress: opts.progress,
    };
    best_under_budget(&base, budget, cost_model, &ctx, &scoring)
}

/// The most accurate point of a written frontier whose cost fits the budget.
fn choose_from_frontier(path: &Path, budget: &Budget) -> Result<(Candidate, Vec<Candidate>)> {
    let frontier = Frontier::load(path)?;
    let points: Vec<Candidate> = frontier
        .points
        .iter()
        .map(|p| Candidate {
            pipeline: if p.config == "original" { String::new() } else { p.config.clone() },
            relus: p.relus,
            bytes: p.bytes,
            seconds: p.seconds,
            calibration_accuracy: Some(p.accuracy),
            probe_accuracy: None,
            dominated_by: None,
        })
        .collect();
    let best = points
        .iter()
        .filter(|p| budget.fits(&p.cost()))
        .max_by(|a, b| {
            a.calibration_accuracy.unwrap_or(0.0).total_cmp(&b.calibration_accuracy.unwrap_or(0.0))
        })
        .cloned()
        .ok_or_else(|| {
            CompileError::new(
                ExitCode::Usage,
                format!("no point of {} fits a budget of {}", path.display(), budget.describe()),
            )
        })?;
    Ok((best, points))
}

/// The seeded draw is the one `pareto` makes, so a frontier point's channel decisions are
/// reproduced exactly when its seed and count are used.
fn calibration_set(run: &RunData, opts: &CompileOptions) -> Result<data::Dataset> {
    let (count, seed) = match &opts.frontier {
        Some(path) => frontier_calibration(path)?,
        None => (opts.calibration_images, opts.seed),
    };
    Ok(training_split(run)?.seeded_subset(count, seed))
}

/// The whole training split of `--data`, read once per run.
fn training_split(run: &RunData) -> Result<Arc<data::Dataset>> {
    run.train(None).map_err(|e| {
        no_fitting_data(e, "gather calibration statistics from the training split", false)
    })
}

/// The calibration count and seed a frontier was searched with.
fn frontier_calibration(path: &Path) -> Result<(usize, u64)> {
    let frontier = Frontier::load(path)?;
    Ok((frontier.calibration_images, frontier.seed))
}

/// The test split of `--data` when accuracy is to be measured: always for a lossy pipeline
/// (unless --no-eval), and whenever --data or --max-drop asks. Data that cannot be read or
/// does not fit the model is an error naming --data and --no-eval.
fn test_set(
    run: &RunData,
    lossy: bool,
    opts: &CompileOptions,
) -> Result<Option<Arc<data::Dataset>>> {
    if !opts.evaluate {
        if opts.max_drop.is_some() {
            return Err(CompileError::new(
                ExitCode::Usage,
                "--max-drop gates on the measured accuracy, but --no-eval skips measuring it: \
                 the gate cannot run; drop one of them",
            )
            .into());
        }
        return Ok(None);
    }
    if !(lossy || opts.data.is_some() || opts.max_drop.is_some()) {
        return Ok(None);
    }
    let what =
        if lossy { "measure the accuracy of this lossy rewrite" } else { "measure accuracy" };
    run.test().map(Some).map_err(|e| no_fitting_data(e, what, true))
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

fn input_name(opts: &CompileOptions) -> String {
    opts.input.display().to_string()
}

/// Accuracy of the original and the rewritten graph on the test split, in one pass each.
fn measure_accuracy(
    run: &RunData,
    model: &Model,
    set: &data::Dataset,
    opts: &CompileOptions,
) -> Result<AccuracyReport> {
    let original = run.original_on_test(opts.progress)?;
    let (eval, _) = crate::eval::evaluator::evaluate_against(
        model,
        "rewritten",
        Some(Reference::Outputs(&original)),
        set,
        crate::eval::RunSpec::default(),
        opts.progress,
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
        max_drop: opts.max_drop,
        passed: opts.max_drop.is_none_or(|m| drop_points <= m),
        normalisation: run.normalisation()?,
        warning: (opts.max_drop.is_none() && drop_points > LOUD_DROP_POINTS).then(|| {
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

/// Real images for the check when the data set is there and fits the model; otherwise `None`
/// and a note saying why (random inputs are always used).
fn real_check_inputs(
    run: &RunData,
    spec: &str,
    opts: &CompileOptions,
) -> (Option<Vec<f32>>, String) {
    let (model, sample) = (&run.original, run.sample.as_slice());
    // The test images already read, when they are of this data set and enough.
    if let Some(test) = run.test_if_read().filter(|t| spec == run.spec && t.len() >= CHECK_IMAGES) {
        let note = format!("{CHECK_IMAGES} real images from {spec}");
        return (Some(test.subset(0..CHECK_IMAGES).images), note);
    }
    // As DataFlags::load, without its notes: these images only feed the output comparison.
    let fit = opts.data_options.fit(sample, "the model");
    let loaded = opts.data_options.normalisation(model).and_then(|norm| {
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
