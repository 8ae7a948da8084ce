//! The frontier of networks trading ReLUs, or estimated PI bytes or latency, against accuracy
//! (`relucompile pareto`).

use super::context::RunData;
use super::finetune::finetune_model;
use super::linearize::LearnedMasks;
use super::shard::Shard;
use super::{DataOptions, TrainOptions, DEFAULT_DATA};
use crate::analysis::cost::CostModel;
use crate::analysis::shapes::sample_shape;
use crate::analysis::stages::residual_adds;
use crate::error::{CompileError, ExitCode};
use crate::eval::evaluator::accuracy_of;
use crate::frontend::{load_model, write_bytes_atomic, write_model_atomic};
use crate::passes::{
    lossy_pipeline, prepare, run_pipeline, PassContext, Pipeline, VerifyOptions, DEFAULT_PIPELINE,
};
use crate::report::plot::{frontier_plot, Axis, PlotPoint, Reference};
use crate::report::thousands;
use crate::search::criticality::criticality;
use crate::search::objective::{Budget, Cost, Objective};
use crate::search::pareto::{frontier_indices, score_all, Journals};
use crate::search::probe::{ensure_probe_images, pareto_layers, probe_set, Prober, PROBED_LAYERS};
use crate::search::{accuracy, build_candidate};
use crate::train::masks::{measured_choice, Granularity, MaskMethod, DEFAULT_MASK_LR};
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A frontier search: candidates scored on calibration images, the frontier measured on the
/// test split, one ONNX file per point and `frontier.json/.csv/.md/.svg/.png` in `output`.
#[derive(Debug, Clone)]
pub struct ParetoOptions {
    /// The ONNX model to reduce.
    pub model: PathBuf,
    /// The output directory; a search interrupted there resumes.
    pub output: PathBuf,
    /// The data set (`fashion-mnist`, an IDX, CIFAR or image-folder directory, or a .npy file).
    pub data: String,
    /// Calibration images drawn (by `seed`) from the training split to choose candidates.
    pub calibration_images: usize,
    /// Seed of the calibration draw; the same seed gives the same frontier.
    pub seed: u64,
    /// Measure the frontier on the first N test images only (`None`: the whole split).
    pub test_limit: Option<usize>,
    /// Input shape with batch (`None`: the model's declared shape).
    pub input_shape: Option<Vec<usize>>,
    /// Recalibrate candidates to the original's outputs before scoring them.
    pub recalibrate: bool,
    /// Try the half-resolution and half-width candidates where the graph takes them.
    pub dimensions: bool,
    /// Cull every subset of the stages (up to `search::pareto::MAX_EXHAUSTIVE_STAGES`), not
    /// only prefixes of the criticality order.
    pub exhaustive_culls: bool,
    /// Show progress bars on stderr.
    pub progress: bool,
    pub data_options: DataOptions,
    /// Fine-tune every frontier point with the original as teacher.
    pub finetune: Option<TrainOptions>,
    /// With `finetune`: cost levels (`50%`, `10000`, `30MB`, `0.3s`) under each of which only
    /// the most accurate frontier point is trained, instead of every point.
    pub finetune_levels: Vec<String>,
    /// Another method's points to draw and tabulate beside the frontier: a JSON file with
    /// `points` (each `accuracy`, `label`, and `relus`, `bytes` or `seconds` for the axis) and
    /// an optional `name`; `docs/deepreduce_reference.json` is one.
    pub reference: Option<PathBuf>,
    /// ReLU budgets (`25%`, `10000`) at which learned ReLU masks (`relucompile linearize`: one
    /// mask epoch, then the distillation of `finetune`, one epoch without it) add a point.
    pub learned: Vec<String>,
    /// The learned points' mask unit.
    pub learned_granularity: Granularity,
    /// Rank the candidates near the frontier after a short distillation on this many training
    /// images (`crate::search::probe`; 0: no probes).
    pub probe_images: usize,
    /// The cost on the frontier's axis.
    pub objective: Objective,
    /// The PI cost model (`crypten` or a JSON file) for the bytes and latency estimates.
    pub cost_model: String,
    /// Build the frontier from the points the shards (`--shard`) trained into `output`,
    /// training none: every point must be there.
    pub merge: bool,
}

impl ParetoOptions {
    /// Search the frontier of `model` into the directory `output` with the defaults.
    pub fn new(model: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        ParetoOptions {
            model: model.into(),
            output: output.into(),
            data: DEFAULT_DATA.into(),
            calibration_images: 2000,
            seed: 0,
            test_limit: None,
            input_shape: None,
            recalibrate: true,
            dimensions: true,
            exhaustive_culls: true,
            progress: false,
            data_options: DataOptions::default(),
            finetune: None,
            probe_images: 0,
            finetune_levels: DEFAULT_FINETUNE_LEVELS.iter().map(|l| l.to_string()).collect(),
            learned: vec![],
            learned_granularity: Granularity::default(),
            reference: None,
            objective: Objective::Relus,
            cost_model: "crypten".into(),
            merge: false,
        }
    }
}

/// The levels of `--finetune-levels` by default: DeepReDuce's range of budgets. A 2-epoch
/// distillation of one ResNet point takes 6-8 minutes on this project's 2-core machines, and
/// the ResNet's frontier has 25 points, so training all of them would take three hours.
pub const DEFAULT_FINETUNE_LEVELS: &[&str] = &["50%", "25%", "15%", "10%", "5%", "2%"];

/// Indices of the most accurate of `points` (cost, accuracy) at or under each level, each
/// once, in the order of `points`. Ties go to the cheaper point.
pub fn best_under_levels(points: &[(f64, f64)], levels: &[f64]) -> Vec<usize> {
    let mut out: Vec<usize> = levels
        .iter()
        .filter_map(|&level| {
            (0..points.len()).filter(|&i| points[i].0 <= level).max_by(|&a, &b| {
                points[a].1.total_cmp(&points[b].1).then(points[b].0.total_cmp(&points[a].0))
            })
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// What a search directory was made from; resuming with anything else is refused.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct SearchKey {
    model_fnv64: String,
    seed: u64,
    calibration_images: usize,
    data: String,
    /// Absent in searches made before recalibration and the dimension knobs existed.
    #[serde(default)]
    recalibrate: bool,
    #[serde(default)]
    dimensions: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrontierPoint {
    pub relus: u64,
    /// Estimated PI bytes per image. Frontiers written before the cost objectives lack it (and
    /// `seconds`): read back as infinite, so no bytes or latency budget is met from them.
    #[serde(default = "infinite")]
    pub bytes: f64,
    /// Estimated PI seconds per image.
    #[serde(default = "infinite")]
    pub seconds: f64,
    pub accuracy: f64,
    /// With --finetune-epochs: the test accuracy before fine-tuning (`accuracy` is after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_before_finetune: Option<f64>,
    pub calibration_accuracy: f64,
    /// Calibration accuracy after the recovery probe, which ranked this point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_accuracy: Option<f64>,
    pub file: String,
    pub config: String,
    /// The pipeline that rebuilds this point's file from the model (`--passes`), recalibration
    /// explicit in it; empty for learned points, which `replay` rebuilds by `linearize`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub passes: String,
    /// The command-line arguments (after `relucompile`, before `-o FILE`) that rebuild this
    /// point's file byte for byte.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replay: Vec<String>,
    /// A learned point's binary masks (relative to the frontier's directory), which the
    /// `relu-masks` pass applies to another graph.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub masks: String,
}

impl FrontierPoint {
    /// The replay as a shell command writing `file`.
    pub fn replay_command(&self) -> String {
        let mut words: Vec<String> = vec!["relucompile".into()];
        words.extend(self.replay.iter().map(|w| shell_word(w)));
        words.push(format!("-o {}", shell_word(&self.file)));
        words.join(" ")
    }
}

/// `word` quoted for a POSIX shell when it holds anything but safe characters.
fn shell_word(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Points of another method (`--reference`), as its file gives them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceSet {
    pub name: String,
    pub points: Vec<ReferencePoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferencePoint {
    #[serde(alias = "config")]
    pub label: String,
    pub accuracy: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relus: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

impl ReferencePoint {
    /// The point's cost on `o`'s axis, if its file gives it.
    fn cost(&self, o: Objective) -> Option<f64> {
        match o {
            Objective::Relus => self.relus.map(|r| r as f64),
            Objective::Bytes => self.bytes,
            Objective::Latency => self.seconds,
        }
    }
}

impl ReferenceSet {
    fn load(path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct File {
            name: Option<String>,
            points: Vec<ReferencePoint>,
        }
        let usage = |m: String| -> anyhow::Error { CompileError::new(ExitCode::Usage, m).into() };
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("--reference {}: {e}", path.display())))?;
        let file: File = serde_json::from_str(&text).map_err(|e| {
            usage(format!(
                "--reference {}: not a list of reference points ({e}); expected \
                 {{\"name\": ..., \"points\": [{{\"label\", \"relus\", \"accuracy\"}}, ...]}}",
                path.display()
            ))
        })?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(ReferenceSet { name: file.name.unwrap_or(stem), points: file.points })
    }
}

impl FrontierPoint {
    fn cost(&self) -> Cost {
        Cost { relus: self.relus, bytes: self.bytes, seconds: self.seconds }
    }
}

fn infinite() -> f64 {
    f64::INFINITY
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Frontier {
    pub model: String,
    /// The cost the frontier minimises.
    pub objective: Objective,
    pub seed: u64,
    pub calibration_images: usize,
    pub test_images: usize,
    pub original: OriginalPoint,
    pub cull_order: Vec<usize>,
    pub candidates: usize,
    /// Training images of each recovery probe (0: candidates ranked without probes).
    pub probe_images: usize,
    /// Candidates probed (the first Pareto layers of the calibration ranking).
    pub probed: usize,
    pub points: Vec<FrontierPoint>,
    /// With --finetune-epochs: the cost levels under each of which the best point was trained.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finetune_levels: Vec<f64>,
    /// `--reference`: another method's points, beside these in the table and the plot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceSet>,
    /// The learned-mask points of `--learned`, on the frontier (`file` set) or dominated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learned: Vec<FrontierPoint>,
    /// How pixels became the inputs, and what states it (recorded in every point's file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalisation: Option<crate::data::Normalisation>,
    /// Set when the model holds nonlinearities the cost model has no price for: the bytes and
    /// latency estimates leave them out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_warning: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OriginalPoint {
    pub relus: u64,
    pub bytes: f64,
    pub seconds: f64,
    pub accuracy: f64,
}

fn fnv64(bytes: &[u8]) -> String {
    let hash = bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("{hash:016x}")
}

fn label(config: &str) -> String {
    if config.is_empty() {
        "original".into()
    } else {
        config.to_string()
    }
}

impl Frontier {
    /// A written frontier: its directory or its `frontier.json`.
    pub fn load(path: &Path) -> Result<Frontier> {
        let file = if path.is_dir() { path.join("frontier.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read the frontier {}", file.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a frontier.json", file.display()))
    }
}

/// Search the frontier and write it to `opts.output`; returns what `frontier.json` holds.
/// The phases: set up (parse the levels, check a resumed directory), score every candidate on
/// calibration images, choose the calibration frontier (after probes), measure it on the test
/// images, train the points worth training, write the frontier.
pub fn pareto(opts: &ParetoOptions) -> Result<Frontier> {
    let role = if opts.merge { Role::Merge } else { Role::Whole };
    let search = Search::set_up(opts, role)?;
    let scoring = search.score()?;
    let (chosen, probed) = search.choose(&scoring)?;
    let measured = search.measure(&scoring, &chosen)?;
    let candidates = search.train(&scoring, &chosen, &measured)?;
    search.write(&scoring, candidates, probed)
}

/// What one shard did, as `DIR/shards/I-of-N/done.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardReport {
    pub shard: Shard,
    /// The points trained by the whole search (every shard's share).
    pub points_to_train: usize,
    /// This shard's share, by configuration, as trained or found already trained.
    pub trained: Vec<String>,
    /// The search's flags beyond `search.json`'s key (fingerprint): `--merge` refuses shards
    /// run with other flags.
    pub flags_fnv64: String,
    pub seconds: f64,
}

/// Run one shard of the search of `opts`: score every candidate (every shard does, so that all
/// agree on the points) and train the shard's share of the points, into `opts.output`. A
/// `--merge` run then writes the frontier, the same files as a search in one process.
pub fn pareto_shard(opts: &ParetoOptions, shard: Shard) -> Result<ShardReport> {
    let started = std::time::Instant::now();
    let search = Search::set_up(opts, Role::Shard(shard))?;
    let scoring = search.score()?;
    let (chosen, _) = search.choose(&scoring)?;
    let measured = search.measure(&scoring, &chosen)?;
    let (points_to_train, share) = search.share(&chosen, &measured);
    let trained = search.train(&scoring, &chosen, &measured)?;
    debug_assert_eq!(trained.len(), share);
    let report = ShardReport {
        shard,
        points_to_train,
        trained: trained.into_iter().map(|(_, p)| p.config).collect(),
        flags_fnv64: search.flags_fingerprint()?,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_bytes_atomic(
        &search.journal_dir.join(SHARD_DONE),
        (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
    )?;
    Ok(report)
}

/// A finished shard's record in its journal directory.
const SHARD_DONE: &str = "done.json";

/// Which part of a search a process runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// All of it.
    Whole,
    /// Scoring, and its share of the training.
    Shard(Shard),
    /// Scoring from a shard's journal, and the frontier from the points the shards trained.
    Merge,
}

/// What every phase of one frontier search shares.
struct Search<'a> {
    opts: &'a ParetoOptions,
    cost_model: CostModel,
    original_cost: Cost,
    /// The cost model's warning about nonlinearities it does not price.
    cost_warning: Option<String>,
    /// The original, prepared (BatchNorm folded): the graph candidates are cut from.
    base: crate::ir::Model,
    run: RunData,
    reference: Option<ReferenceSet>,
    finetune_levels: Vec<f64>,
    learned_budgets: Vec<u64>,
    role: Role,
    /// Where the journals (criticality, candidates, probes) go: the output directory, or a
    /// shard's own directory under it, so that shards never write the same file.
    journal_dir: PathBuf,
}

/// The scoring phase's outcome.
struct Scoring {
    /// The calibration draw's size.
    drawn: usize,
    /// The draw's fitting half, with the original as the reference to recalibrate against.
    ctx: PassContext,
    /// The draw's held-out half, on which candidates are scored.
    calibration: crate::data::Dataset,
    cull_order: Vec<usize>,
    scored: Vec<crate::search::pareto::Scored>,
}

/// A point measured on the test images: its graph (recalibrated, cleaned), cost and accuracy.
type Measured = (crate::ir::Model, Cost, f64);

impl<'a> Search<'a> {
    fn set_up(opts: &'a ParetoOptions, role: Role) -> Result<Self> {
        let cost_model = CostModel::load(&opts.cost_model)?;
        let objective = opts.objective;
        let original = load_model(&opts.model)?;
        let sample = sample_shape(&original, opts.input_shape.as_deref())?;
        let base = prepare(&original, &PassContext::new(sample.clone()))?;
        let original_census = crate::analysis::census::census(&original, &sample)?;
        let original_cost = Cost::from_census(&original_census, &cost_model);
        let cost_warning = cost_model.estimate(&original_census).warning;
        let reference = opts.reference.as_deref().map(ReferenceSet::load).transpose()?;
        let finetune_levels: Vec<f64> = opts
            .finetune_levels
            .iter()
            .map(|spec| {
                Budget::parse(objective, spec, &original_cost).map(|b| b.limit).map_err(|e| {
                    CompileError::new(ExitCode::Usage, format!("--finetune-levels {spec}: {e}"))
                })
            })
            .collect::<Result<_, _>>()?;
        let learned_budgets: Vec<u64> = opts
            .learned
            .iter()
            .map(|spec| {
                Budget::parse(Objective::Relus, spec, &original_cost)
                    .map(|b| b.limit as u64)
                    .map_err(|e| {
                        CompileError::new(ExitCode::Usage, format!("--learned {spec}: {e}"))
                    })
            })
            .collect::<Result<_, _>>()?;
        let run = RunData::new(
            original,
            sample,
            opts.model.display().to_string(),
            (&opts.data, &opts.data_options),
            opts.test_limit,
        );
        // An unstated normalisation stops the search before anything is read or written.
        run.normalisation()?;
        let key = SearchKey {
            model_fnv64: fnv64(&std::fs::read(&opts.model)?),
            seed: opts.seed,
            calibration_images: opts.calibration_images,
            data: match opts.data_options.describe() {
                flags if flags.is_empty() => opts.data.clone(),
                flags => format!("{} {flags}", opts.data),
            },
            recalibrate: opts.recalibrate,
            dimensions: opts.dimensions,
        };
        check_resume(&opts.output, &key, false)?;
        // Measured before anything is written: an original near chance on the data stops the
        // search here (exit 8).
        run.original_on_test(opts.progress)?;
        std::fs::create_dir_all(&opts.output).with_context(|| {
            format!("cannot create the output directory {}", opts.output.display())
        })?;
        check_resume(&opts.output, &key, true)?;
        let journal_dir = match role {
            Role::Shard(shard) => opts.output.join(SHARDS_DIR).join(shard.dir_name()),
            Role::Whole | Role::Merge => opts.output.clone(),
        };
        std::fs::create_dir_all(&journal_dir)
            .with_context(|| format!("cannot create {}", journal_dir.display()))?;
        Search {
            opts,
            cost_model,
            original_cost,
            cost_warning,
            base,
            run,
            reference,
            finetune_levels,
            learned_budgets,
            role,
            journal_dir,
        }
        .seeded()
    }

    /// A merge takes criticality and probes from a finished shard, after checking that every
    /// finished shard ran with this search's flags.
    fn seeded(self) -> Result<Self> {
        if self.role != Role::Merge {
            return Ok(self);
        }
        let flags = self.flags_fingerprint()?;
        let finished = finished_shards(&self.opts.output)?;
        if finished.is_empty() {
            return Err(CompileError::new(
                ExitCode::Incomplete,
                format!(
                    "{} holds no finished shard: run the shards first (pareto ... --shard I/N)",
                    self.opts.output.display()
                ),
            )
            .into());
        }
        for (dir, report) in &finished {
            if report.flags_fnv64 != flags {
                return Err(CompileError::new(
                    ExitCode::Usage,
                    format!(
                        "shard {} ({}) ran with other search flags than this merge: give \
                         --merge the same flags as the shards",
                        report.shard,
                        dir.display()
                    ),
                )
                .into());
            }
        }
        // The scores are read from every shard's journal ([`Search::scoring_journals`]);
        // criticality and probes, which every shard ran whole, are taken from one.
        let source = &finished[0].0;
        for journal in SHARED_JOURNALS {
            let (from, to) = (source.join(journal), self.opts.output.join(journal));
            if from.exists() && !to.exists() {
                write_bytes_atomic(&to, &std::fs::read(&from)?)?;
            }
        }
        Ok(self)
    }

    /// A fingerprint of the flags that decide which points are trained and how (a shard and
    /// its merge must agree on them; `search.json` holds the rest).
    fn flags_fingerprint(&self) -> Result<String> {
        let o = self.opts;
        let training = o.finetune.as_ref().map(|t| (&t.recipe, t.train_limit, t.keep_trained));
        let flags = serde_json::json!({
            "training": training,
            "finetune_levels": self.finetune_levels,
            "learned": self.learned_budgets,
            "learned_granularity": o.learned_granularity.to_string(),
            "probe_images": o.probe_images,
            "objective": o.objective,
            "cost_model": o.cost_model,
            "test_limit": o.test_limit,
            "exhaustive_culls": o.exhaustive_culls,
            "input_shape": o.input_shape,
        });
        Ok(fnv64(serde_json::to_string(&flags)?.as_bytes()))
    }

    fn sample(&self) -> &[usize] {
        &self.run.sample
    }

    /// The pipeline `compile --passes` runs to rebuild a structural point from the model: the
    /// one its lossy flags would run (the default pipeline, the configuration placed in it,
    /// then recalibration), which is what [`Search::measure`] builds.
    fn replay_passes(&self, config: &str) -> Result<String> {
        let steps = lossy_pipeline(DEFAULT_PIPELINE, config, self.opts.recalibrate)?;
        Ok(Pipeline::new(steps)?.text())
    }

    /// The data flags of this search, as command-line words.
    fn data_words(&self) -> Vec<String> {
        let opts = self.opts;
        let mut words = vec!["--data".to_string(), opts.data.clone()];
        words.extend(opts.data_options.describe().split_whitespace().map(String::from));
        if let Some(shape) = &opts.input_shape {
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            words.extend(["--input-shape".into(), dims.join("x")]);
        }
        if let Some(l) = opts.test_limit {
            words.extend(["--limit".into(), l.to_string()]);
        }
        words
    }

    /// `compile` arguments that rebuild a structural point: its pipeline on the same
    /// calibration draw, then the same fine-tuning.
    fn structural_replay(&self, point: &FrontierPoint) -> Vec<String> {
        let opts = self.opts;
        let mut words = vec![
            opts.model.display().to_string(),
            "--passes".into(),
            point.passes.clone(),
            "--calibration-images".into(),
            opts.calibration_images.to_string(),
            "--seed".into(),
            opts.seed.to_string(),
        ];
        words.extend(self.data_words());
        words.extend(self.training_words(opts.finetune.as_ref(), "--finetune-epochs"));
        words
    }

    /// `linearize` arguments that rebuild a learned point: the same masks, learned and
    /// distilled with the same recipe.
    fn learned_replay(&self, budget: u64) -> Vec<String> {
        let opts = self.opts;
        let mut words = vec![
            "linearize".to_string(),
            opts.model.display().to_string(),
            "--relu-budget".into(),
            budget.to_string(),
            "--granularity".into(),
            opts.learned_granularity.to_string(),
            "--mask-epochs".into(),
            LEARNED_MASK_EPOCHS.to_string(),
            "--mask-lr".into(),
            DEFAULT_MASK_LR.to_string(),
        ];
        words.extend(self.data_words());
        let training = opts.finetune.clone().unwrap_or_else(|| TrainOptions::epochs(1));
        words.extend(self.training_words(Some(&training), "--epochs"));
        words
    }

    /// The fine-tuning flags of `training` (the frontier's recipe is the default one).
    fn training_words(&self, training: Option<&TrainOptions>, epochs_flag: &str) -> Vec<String> {
        let Some(t) = training else { return Vec::new() };
        let mut words = vec![epochs_flag.to_string(), t.recipe.epochs.to_string()];
        if let Some(l) = t.train_limit {
            words.extend(["--train-limit".into(), l.to_string()]);
        }
        if t.keep_trained {
            words.push("--keep-trained".into());
        }
        words
    }

    fn cost_of(&self, s: &crate::search::pareto::Scored) -> f64 {
        s.cost.unwrap_or_default().get(self.opts.objective)
    }

    /// This process's scoring journal; a shard also reads the other shards' as they score, and
    /// starts at its own share of the candidate list, so that concurrent shards divide the
    /// scoring between them (without waiting for each other: a shard alone scores everything).
    fn scoring_journals(&self) -> Journals {
        let own = self.journal_dir.join(CANDIDATES_JOURNAL);
        let shards = self.opts.output.join(SHARDS_DIR);
        let shard = match self.role {
            Role::Whole => return Journals::single(own),
            // A merge scores nothing: every candidate is in some shard's journal.
            Role::Merge => {
                let mut others: Vec<PathBuf> = std::fs::read_dir(&shards)
                    .map(|entries| {
                        entries.flatten().map(|e| e.path().join(CANDIDATES_JOURNAL)).collect()
                    })
                    .unwrap_or_default();
                others.sort();
                return Journals { own, others, start: (0, 1) };
            }
            Role::Shard(shard) => shard,
        };
        let others = (0..shard.count)
            .filter(|&i| i != shard.index)
            .map(|i| {
                let other = Shard { index: i, count: shard.count };
                shards.join(other.dir_name()).join(CANDIDATES_JOURNAL)
            })
            .collect();
        Journals { own, others, start: (shard.index, shard.count) }
    }

    /// Criticality (from the directory when a run wrote it), then every candidate scored on
    /// the calibration draw's held-out half, resuming from `candidates.jsonl`.
    fn score(&self) -> Result<Scoring> {
        let (opts, base) = (self.opts, &self.base);
        let train = self.run.train(None)?;
        let draw = train.seeded_subset(opts.calibration_images, opts.seed);
        let (mut ctx, calibration) = PassContext::fitted_on(self.sample().to_vec(), &draw, base);
        if !opts.recalibrate {
            ctx.reference = None;
        }
        let crit_path = self.journal_dir.join("criticality.json");
        let cull_order = match std::fs::read_to_string(&crit_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        {
            Some(v) => serde_json::from_value::<Vec<usize>>(v["cull_order"].clone())?,
            None => {
                let c = criticality(base, &ctx, &calibration, None)?;
                write_bytes_atomic(&crit_path, serde_json::to_string_pretty(&c)?.as_bytes())?;
                c.cull_order
            }
        };
        let shapes = crate::analysis::shapes::infer_shapes(base, self.sample(), 1)?;
        let residual = !residual_adds(&base.graph, &shapes).is_empty();
        // The dimension knobs enter the search where the graph takes them.
        let knobs = crate::search::candidates::knobs_for(
            base,
            self.sample(),
            opts.dimensions,
            opts.objective.values_pooling(),
        );
        let scored = score_all(
            base,
            &cull_order,
            residual,
            &knobs,
            opts.exhaustive_culls,
            &ctx,
            &calibration,
            &self.cost_model,
            &self.scoring_journals(),
            opts.progress,
        )?;
        Ok(Scoring { drawn: draw.len(), ctx, calibration, cull_order, scored })
    }

    /// The frontier on calibration images (after recovery probes, when they run): indices
    /// into `scored` with each one's probe accuracy, and how many candidates were probed.
    #[allow(clippy::type_complexity)]
    fn choose(&self, s: &Scoring) -> Result<(Vec<(usize, Option<f64>)>, usize)> {
        let opts = self.opts;
        let calib_points: Vec<(f64, f64)> =
            s.scored.iter().map(|c| (self.cost_of(c), c.calibration_accuracy)).collect();
        let probe_images = opts.probe_images;
        if probe_images == 0 {
            return Ok((
                frontier_indices(&calib_points).into_iter().map(|i| (i, None)).collect(),
                0,
            ));
        }
        let near = pareto_layers(&calib_points, PROBED_LAYERS);
        // The probes train on training images the calibration draw does not hold.
        let train = self.run.train(None)?;
        let probe_set = probe_set(&train, s.drawn, probe_images, opts.seed);
        ensure_probe_images(&probe_set, probe_images, s.drawn, &opts.data)?;
        let configs: Vec<String> = near.iter().map(|&i| s.scored[i].config.clone()).collect();
        let records = Prober {
            base: &self.base,
            ctx: &s.ctx,
            train: &probe_set,
            score: &s.calibration,
            recipe: opts.finetune.as_ref().map(|t| t.recipe.clone()).unwrap_or_default(),
            journal: Some(&self.journal_dir.join("probes.jsonl")),
            progress: opts.progress,
        }
        .probe(&configs)?;
        let points: Vec<(f64, f64)> = near
            .iter()
            .zip(&records)
            .map(|(&i, r)| (self.cost_of(&s.scored[i]), r.accuracy))
            .collect();
        let chosen = frontier_indices(&points)
            .into_iter()
            .map(|k| (near[k], Some(records[k].accuracy)))
            .collect();
        Ok((chosen, near.len()))
    }

    /// Each chosen point built, cleaned, costed and measured once on the test images.
    fn measure(&self, s: &Scoring, chosen: &[(usize, Option<f64>)]) -> Result<Vec<Measured>> {
        let test = self.run.test()?;
        chosen
            .par_iter()
            .map(|&(i, _)| {
                let (mut m, _) = build_candidate(&self.base, &s.scored[i].config, &s.ctx)?;
                run_pipeline(
                    &mut m,
                    &Pipeline::parse(crate::passes::DEFAULT_PIPELINE)?,
                    &s.ctx,
                    &VerifyOptions::default(),
                )?;
                let cost = Cost::of(&m, self.sample(), &self.cost_model)?;
                let acc = accuracy(&m, &test)?;
                Ok((m, cost, acc))
            })
            .collect()
    }

    /// The measured points that go on: the test frontier (every probed point, when probes
    /// ranked them), and with `--finetune-epochs` only the best under each level.
    fn kept(&self, chosen: &[(usize, Option<f64>)], measured: &[Measured]) -> Vec<usize> {
        let (opts, objective) = (self.opts, self.opts.objective);
        // Without probes, the untrained test accuracy decides which points are worth
        // training; probed points were ranked by what they recover, so every one is trained.
        let keep: Vec<usize> = if opts.probe_images == 0 {
            let test_points: Vec<(f64, f64)> =
                measured.iter().map(|(_, c, a)| (c.get(objective), *a)).collect();
            frontier_indices(&test_points)
        } else {
            (0..measured.len()).collect()
        };
        if opts.finetune.is_none() {
            return keep;
        }
        // Training takes minutes a point: only the best point under each level is trained.
        let ranked: Vec<(f64, f64)> = keep
            .iter()
            .map(|&k| (measured[k].1.get(objective), chosen[k].1.unwrap_or(measured[k].2)))
            .collect();
        best_under_levels(&ranked, &self.finetune_levels).into_iter().map(|i| keep[i]).collect()
    }

    /// The points the search trains (fine-tuned points, then learned ones; the order in which
    /// shards are dealt them), and how many of them this process trains.
    fn share(&self, chosen: &[(usize, Option<f64>)], measured: &[Measured]) -> (usize, usize) {
        let tuned =
            if self.opts.finetune.is_some() { self.kept(chosen, measured).len() } else { 0 };
        let total = tuned + self.learned_budgets.len();
        let mine = match self.role {
            Role::Shard(shard) => (0..total).filter(|&j| shard.owns(j)).count(),
            Role::Whole | Role::Merge => total,
        };
        (total, mine)
    }

    /// Whether this process trains work item `item` (of [`Search::share`]'s order).
    fn trains(&self, item: usize) -> bool {
        match self.role {
            Role::Shard(shard) => shard.owns(item),
            Role::Whole | Role::Merge => true,
        }
    }

    /// A merge trains nothing: every trained point must be in the directory. Names each
    /// missing one with the shard it was dealt to.
    fn check_trained(
        &self,
        s: &Scoring,
        chosen: &[(usize, Option<f64>)],
        keep: &[usize],
    ) -> Result<()> {
        let opts = self.opts;
        let mut wanted = Vec::new();
        if opts.finetune.is_some() {
            for &k in keep {
                let config = &s.scored[chosen[k].0].config;
                wanted.push((FINETUNED_DIR, finetuned_key(opts, config)?, config.clone()));
            }
        }
        for &budget in &self.learned_budgets {
            let config = learned_config(budget, opts.learned_granularity);
            wanted.push((LEARNED_DIR, learned_key(opts, budget)?, config));
        }
        let counts = shard_counts(&opts.output);
        let missing: Vec<String> = wanted
            .iter()
            .enumerate()
            .filter(|(_, (dir, key, config))| {
                cached_record(&opts.output.join(dir), key, config).is_none()
            })
            .map(|(j, (_, _, config))| match counts.as_slice() {
                [n] => format!("{} (shard {})", label(config), Shard { index: j % n, count: *n }),
                _ => label(config),
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(CompileError::new(
            ExitCode::Incomplete,
            format!(
                "{} of the {} trained points are not in {} yet: {}; run (or wait for) those \
                 shards, then merge again",
                missing.len(),
                wanted.len(),
                opts.output.display(),
                missing.join(", ")
            ),
        )
        .into())
    }

    /// The points that go on the final frontier, each with its graph: the measured points
    /// worth keeping (with `--finetune-epochs`, the best under each level, trained), then the
    /// learned-mask points. Fine-tuning runs on every core, so the points take their turn. A
    /// shard returns only the points it trained.
    fn train(
        &self,
        s: &Scoring,
        chosen: &[(usize, Option<f64>)],
        measured: &[Measured],
    ) -> Result<Vec<(crate::ir::Model, FrontierPoint)>> {
        let opts = self.opts;
        let keep = self.kept(chosen, measured);
        if self.role == Role::Merge {
            self.check_trained(s, chosen, &keep)?;
        }
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        let (mut item, mut done) = (0, 0);
        let (_, to_train) = self.share(chosen, measured);
        let mut progress = |config: &str, before: f64, after: f64| {
            done += 1;
            crate::eval::evaluator::progress_line(opts.progress, || {
                let elapsed = started.elapsed().as_secs_f64();
                let left = elapsed / done as f64 * (to_train - done) as f64;
                format!(
                    "trained point {done}/{to_train} ({config}): {:.2}% -> {:.2}%, {elapsed:.0} s \
                     elapsed, ETA {left:.0} s",
                    100.0 * before,
                    100.0 * after
                )
            });
        };
        for k in keep {
            let (model, cost, acc) = &measured[k];
            let (scored_ix, probe_accuracy) = chosen[k];
            let config = &s.scored[scored_ix].config;
            let (model, acc, before) = if opts.finetune.is_some() {
                item += 1;
                if !self.trains(item - 1) {
                    continue;
                }
                let (tuned, after) = finetuned_point(opts, &self.run, model, config)?;
                progress(&label(config), *acc, after);
                (tuned, after, Some(*acc))
            } else if matches!(self.role, Role::Shard(_)) {
                continue;
            } else {
                (model.clone(), *acc, None)
            };
            let point = FrontierPoint {
                relus: cost.relus,
                bytes: cost.bytes,
                seconds: cost.seconds,
                accuracy: acc,
                accuracy_before_finetune: before,
                calibration_accuracy: s.scored[scored_ix].calibration_accuracy,
                probe_accuracy,
                file: String::new(),
                config: label(config),
                passes: self.replay_passes(config)?,
                replay: Vec::new(),
                masks: String::new(),
            };
            let point = FrontierPoint { replay: self.structural_replay(&point), ..point };
            out.push((model, point));
        }
        if !self.learned_budgets.is_empty() {
            // The learned points distil from the prepared graph, on the same images.
            let run = self.run.with_original(self.base.clone());
            for &budget in &self.learned_budgets {
                item += 1;
                if !self.trains(item - 1) {
                    continue;
                }
                let (model, after, before, masks) = learned_point(opts, &run, budget)?;
                let config = learned_config(budget, opts.learned_granularity);
                progress(&config, before, after);
                let cost = Cost::of(&model, self.sample(), &self.cost_model)?;
                let point = FrontierPoint {
                    relus: cost.relus,
                    bytes: cost.bytes,
                    seconds: cost.seconds,
                    accuracy: after,
                    accuracy_before_finetune: Some(before),
                    calibration_accuracy: accuracy(&model, &s.calibration)?,
                    probe_accuracy: None,
                    file: String::new(),
                    config,
                    passes: String::new(),
                    replay: self.learned_replay(budget),
                    masks,
                };
                out.push((model, point));
            }
        }
        Ok(out)
    }

    /// The final frontier among `candidates` (trained points compared by the accuracy they
    /// reached), one file per point, and `frontier.json/.csv/.md/.svg/.png`.
    fn write(
        &self,
        s: &Scoring,
        mut candidates: Vec<(crate::ir::Model, FrontierPoint)>,
        probed: usize,
    ) -> Result<Frontier> {
        let opts = self.opts;
        let final_points: Vec<(f64, f64)> =
            candidates.iter().map(|(_, p)| (p.cost().get(opts.objective), p.accuracy)).collect();
        let mut points = Vec::new();
        for (k, i) in frontier_indices(&final_points).into_iter().enumerate() {
            let (model, point) = &mut candidates[i];
            point.file = format!("point-{k:02}.onnx");
            self.run.record_normalisation(model);
            write_model_atomic(&opts.output.join(&point.file), model)?;
            points.push(point.clone());
        }
        let learned: Vec<FrontierPoint> = candidates
            .iter()
            .filter(|(_, p)| p.config.starts_with(LEARNED_LABEL))
            .map(|(_, p)| p.clone())
            .collect();
        // Points of an earlier, interrupted or different run must not linger beside this one.
        let written: Vec<&str> = points.iter().map(|p| p.file.as_str()).collect();
        for entry in std::fs::read_dir(&opts.output)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("point-")
                && name.ends_with(".onnx")
                && !written.contains(&name.as_str())
            {
                std::fs::remove_file(entry.path())?;
            }
        }
        let test = self.run.test()?;
        let original_accuracy = accuracy_of(&*self.run.original_on_test(false)?, &test);
        let frontier = Frontier {
            model: opts.model.display().to_string(),
            objective: opts.objective,
            seed: opts.seed,
            calibration_images: s.drawn,
            test_images: test.len(),
            original: OriginalPoint {
                relus: self.original_cost.relus,
                bytes: self.original_cost.bytes,
                seconds: self.original_cost.seconds,
                accuracy: original_accuracy,
            },
            cull_order: s.cull_order.clone(),
            candidates: s.scored.len(),
            probe_images: opts.probe_images,
            probed,
            points,
            finetune_levels: if opts.finetune.is_some() {
                self.finetune_levels.clone()
            } else {
                vec![]
            },
            learned,
            reference: self.reference.clone(),
            normalisation: Some(self.run.normalisation()?),
            cost_warning: self.cost_warning.clone(),
        };
        write_outputs(&opts.output, &frontier)?;
        Ok(frontier)
    }
}

/// Refuse a directory holding another search; with `record`, write this search's key into a
/// directory that holds none.
fn check_resume(dir: &Path, key: &SearchKey, record: bool) -> Result<()> {
    let path = dir.join("search.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let old: SearchKey = serde_json::from_str(&text).with_context(|| {
                format!("{} is not a relucompile search header", path.display())
            })?;
            if &old != key {
                return Err(CompileError::new(
                    ExitCode::Usage,
                    format!(
                        "{} holds a search of another model, seed or data ({old:?}); \
                         remove it or choose another -o to start afresh",
                        dir.display()
                    ),
                )
                .into());
            }
            Ok(())
        }
        Err(_) if record => {
            write_bytes_atomic(&path, serde_json::to_string_pretty(key)?.as_bytes())
        }
        Err(_) => Ok(()),
    }
}

fn write_outputs(dir: &Path, f: &Frontier) -> Result<()> {
    write_bytes_atomic(
        &dir.join("frontier.json"),
        (serde_json::to_string_pretty(f)? + "\n").as_bytes(),
    )?;
    let mut csv = String::from(
        "relus,bytes,seconds,accuracy,calibration_accuracy,probe_accuracy,file,config\n",
    );
    let probe = |p: &FrontierPoint| p.probe_accuracy.map(|a| format!("{a:.4}")).unwrap_or_default();
    for p in &f.points {
        csv += &format!(
            "{},{:.0},{:.4},{:.4},{:.4},{},{},\"{}\"\n",
            p.relus,
            p.bytes,
            p.seconds,
            p.accuracy,
            p.calibration_accuracy,
            probe(p),
            p.file,
            p.config
        );
    }
    write_bytes_atomic(&dir.join("frontier.csv"), csv.as_bytes())?;
    let mut md = format!(
        "# {} frontier of {}\n\nOriginal: {} ReLUs, est. {:.1} MB and {:.3} s per image, {:.2}% on {} test images.\n\n\
         | ReLUs | est. MB | est. s | test accuracy | calibration accuracy | configuration | file |\n|---:|---:|---:|---:|---:|---|---|\n",
        title_cost(f.objective),
        f.model,
        thousands(f.original.relus),
        f.original.bytes / 1e6,
        f.original.seconds,
        100.0 * f.original.accuracy,
        f.test_images
    );
    for p in &f.points {
        let probed = p.probe_accuracy.map(|a| format!(" ({:.2}% after probe)", 100.0 * a));
        md += &format!(
            "| {} | {:.1} | {:.3} | {:.2}% | {:.2}%{} | `{}` | {} |\n",
            thousands(p.relus),
            p.bytes / 1e6,
            p.seconds,
            100.0 * p.accuracy,
            100.0 * p.calibration_accuracy,
            probed.unwrap_or_default(),
            p.config,
            p.file
        );
    }
    let replays: Vec<&FrontierPoint> = f.points.iter().filter(|p| !p.replay.is_empty()).collect();
    if !replays.is_empty() {
        md += "\nEach point's file, rebuilt byte for byte:\n\n```sh\n";
        for p in replays {
            md += &format!("{}\n", p.replay_command());
        }
        md += "```\n";
    }
    if let Some(r) = &f.reference {
        md += &format!("\n{}:\n\n| point | ReLUs | accuracy |\n|---|---:|---:|\n", r.name);
        for p in &r.points {
            let relus = p.relus.map(thousands).unwrap_or_default();
            md += &format!("| `{}` | {} | {:.2}% |\n", p.label, relus, 100.0 * p.accuracy);
        }
    }
    write_bytes_atomic(&dir.join("frontier.md"), md.as_bytes())?;
    let o = f.objective;
    let cost = |relus: u64, bytes: f64, seconds: f64| Cost { relus, bytes, seconds }.get(o);
    let plot_points: Vec<PlotPoint> = f
        .points
        .iter()
        .map(|p| PlotPoint {
            cost: cost(p.relus, p.bytes, p.seconds),
            accuracy: p.accuracy,
            label: p.config.clone(),
        })
        .collect();
    let original = PlotPoint {
        cost: cost(f.original.relus, f.original.bytes, f.original.seconds),
        accuracy: f.original.accuracy,
        label: "original".into(),
    };
    let format = move |v: f64| o.show(v);
    let reference_points: Vec<PlotPoint> = f
        .reference
        .iter()
        .flat_map(|r| &r.points)
        .filter_map(|p| {
            Some(PlotPoint { cost: p.cost(o)?, accuracy: p.accuracy, label: p.label.clone() })
        })
        .collect();
    let reference =
        f.reference.as_ref().map(|r| Reference { name: &r.name, points: &reference_points });
    frontier_plot(
        &dir.join("frontier"),
        &format!("{} frontier: {}", title_cost(o), f.model),
        &Axis { desc: o.axis(), format: &format },
        &original,
        &plot_points,
        reference.as_ref(),
    )
}

/// "ReLU/accuracy", "PI bytes/accuracy", "PI latency/accuracy".
fn title_cost(o: Objective) -> &'static str {
    match o {
        Objective::Relus => "ReLU/accuracy",
        Objective::Bytes => "PI bytes/accuracy",
        Objective::Latency => "PI latency/accuracy",
    }
}

/// What `finetuned/KEY.json` records beside `finetuned/KEY.onnx`.
#[derive(Serialize, Deserialize)]
struct FinetunedRecord {
    config: String,
    accuracy_after: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accuracy_before: Option<f64>,
}

/// Where trained points are kept in a search directory (shared by its shards: each point is
/// written by the one shard it was dealt to).
const FINETUNED_DIR: &str = "finetuned";
const LEARNED_DIR: &str = "learned";
/// The shards' own directories (`I-of-N`); their scoring journal, and the journals a merge
/// copies from one of them.
const SHARDS_DIR: &str = "shards";
const CANDIDATES_JOURNAL: &str = "candidates.jsonl";
const SHARED_JOURNALS: [&str; 2] = ["criticality.json", "probes.jsonl"];

/// The shards that finished in `dir`, each with its directory and record, in name order.
fn finished_shards(dir: &Path) -> Result<Vec<(PathBuf, ShardReport)>> {
    let Ok(entries) = std::fs::read_dir(dir.join(SHARDS_DIR)) else { return Ok(vec![]) };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        let path = d.join(SHARD_DONE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let report: ShardReport = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a shard's record", path.display()))?;
            out.push((d, report));
        }
    }
    Ok(out)
}

/// The shard counts of the shard directories in `dir` (`I-of-N`), each once.
fn shard_counts(dir: &Path) -> Vec<usize> {
    let Ok(entries) = std::fs::read_dir(dir.join(SHARDS_DIR)) else { return vec![] };
    let mut counts: Vec<usize> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.split_once("-of-").and_then(|(_, n)| n.parse().ok())
        })
        .collect();
    counts.sort_unstable();
    counts.dedup();
    counts
}

/// The cache key of a fine-tuned point: its configuration, the recipe and the test images.
fn finetuned_key(opts: &ParetoOptions, config: &str) -> Result<String> {
    let training = opts.finetune.as_ref().context("no fine-tuning recipe")?;
    Ok(fnv64(
        serde_json::to_string(&(config, &training.recipe, training.train_limit, opts.test_limit))?
            .as_bytes(),
    ))
}

/// Fine-tune one frontier point, or take it from an earlier run of the same search: each
/// trained point is kept under `finetuned/`, keyed by its configuration, the recipe and the
/// test images, so an interrupted search resumes without training a point twice (and the
/// training itself checkpoints every epoch under `finetuned/KEY.training/`).
fn finetuned_point(
    opts: &ParetoOptions,
    run: &RunData,
    model: &crate::ir::Model,
    config: &str,
) -> Result<(crate::ir::Model, f64)> {
    let progress = opts.progress;
    let mut training = opts.finetune.clone().context("no fine-tuning recipe")?;
    let key = finetuned_key(opts, config)?;
    let dir = opts.output.join(FINETUNED_DIR);
    let checkpoint = dir.join(format!("{key}.training"));
    training.checkpoint_dir = Some(checkpoint.clone());
    training.resume = true;
    let (model, after, _) = cached_training(&dir, &key, config, || {
        let (tuned, report) = finetune_model(model, run, &training, progress)
            .with_context(|| format!("fine-tuning frontier point {}", label(config)))?;
        Ok((tuned, report.accuracy_after, None))
    })?;
    // The point is kept: its training checkpoint is no longer needed.
    std::fs::remove_dir_all(&checkpoint).ok();
    Ok((model, after))
}

/// The record of a trained point in `dir`, when an earlier run (or a shard) wrote it whole.
fn cached_record(dir: &Path, key: &str, config: &str) -> Option<FinetunedRecord> {
    let (onnx, json) = (dir.join(format!("{key}.onnx")), dir.join(format!("{key}.json")));
    let text = std::fs::read_to_string(json).ok()?;
    let record = serde_json::from_str::<FinetunedRecord>(&text).ok()?;
    (record.config == config && onnx.is_file()).then_some(record)
}

/// A trained point kept as `dir/KEY.onnx` beside `dir/KEY.json`: taken from there when an
/// earlier run of the search wrote it, else trained by `train` and written. Either way the
/// graph returned is the one read back from the file, so a point trained here and one trained
/// by a shard give the frontier the same bytes.
fn cached_training(
    dir: &Path,
    key: &str,
    config: &str,
    train: impl FnOnce() -> Result<(crate::ir::Model, f64, Option<f64>)>,
) -> Result<(crate::ir::Model, f64, Option<f64>)> {
    let onnx = dir.join(format!("{key}.onnx"));
    if let Some(r) = cached_record(dir, key, config) {
        return Ok((load_model(&onnx)?, r.accuracy_after, r.accuracy_before));
    }
    let (model, accuracy_after, accuracy_before) = train()?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_model_atomic(&onnx, &model)?;
    let record = FinetunedRecord { config: config.into(), accuracy_after, accuracy_before };
    // The record goes last: it says the graph beside it is whole.
    write_bytes_atomic(
        &dir.join(format!("{key}.json")),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    Ok((load_model(&onnx)?, accuracy_after, accuracy_before))
}

/// How a learned-mask point's configuration reads: `learned-masks(BUDGET)`, or
/// `learned-masks(BUDGET,pixel)`.
const LEARNED_LABEL: &str = "learned-masks";

/// Mask epochs of a learned point (the replay names the same).
const LEARNED_MASK_EPOCHS: usize = 1;

fn learned_config(budget: u64, granularity: Granularity) -> String {
    match granularity {
        Granularity::Channel => format!("{LEARNED_LABEL}({budget})"),
        _ => format!("{LEARNED_LABEL}({budget},{granularity})"),
    }
}

/// The cache key of a learned point: its budget, the recipe, the test images and the mask
/// unit.
fn learned_key(opts: &ParetoOptions, budget: u64) -> Result<String> {
    let training = opts.finetune.clone().unwrap_or_else(|| TrainOptions::epochs(1));
    let mut key = serde_json::to_string(&(
        budget,
        &training.recipe,
        training.train_limit,
        opts.test_limit,
        DEFAULT_MASK_LR,
    ))?;
    // Channel masks keep the key they had before pixel masks existed, so their caches hold;
    // pixel masks name their method (the penalty's pixel points are not reused as pruned ones).
    let (granularity, method) = learned_mask_kind(opts);
    if granularity != Granularity::Channel {
        key += &format!("{granularity}/{method}");
    }
    Ok(fnv64(key.as_bytes()))
}

/// The learned points' granularity and the method measured best for it (pixel masks pruned,
/// channel masks under the penalty).
fn learned_mask_kind(opts: &ParetoOptions) -> (Granularity, MaskMethod) {
    measured_choice(1.0, Some(opts.learned_granularity), None)
}

/// One learned-mask point at `budget` ReLUs: (distilled graph, its test accuracy, the test
/// accuracy of the binarised graph before distillation). Kept under `learned/` like
/// [`finetuned_point`]; the mask phase and the distillation checkpoint there as they go.
/// A learned point: its graph, accuracy after and before distillation, and where its masks
/// are (relative to the frontier's directory).
fn learned_point(
    opts: &ParetoOptions,
    run: &RunData,
    budget: u64,
) -> Result<(crate::ir::Model, f64, f64, String)> {
    let progress = opts.progress;
    let mut training = opts.finetune.clone().unwrap_or_else(|| TrainOptions::epochs(1));
    let (granularity, method) = learned_mask_kind(opts);
    let key = learned_key(opts, budget)?;
    let dir = opts.output.join(LEARNED_DIR);
    training.checkpoint_dir = Some(dir.join(&key));
    training.resume = true;
    let config = learned_config(budget, granularity);
    let (model, after, before) = cached_training(&dir, &key, &config, || {
        let learned = LearnedMasks {
            run,
            budget,
            max_layers: None,
            granularity,
            method,
            mask_epochs: LEARNED_MASK_EPOCHS,
            mask_lr: DEFAULT_MASK_LR,
            training: &training,
            progress,
        }
        .run()
        .with_context(|| format!("learning ReLU masks to {budget} ReLUs"))?;
        let f = &learned.finetune;
        Ok((learned.model, f.accuracy_after, Some(f.accuracy_before)))
    })?;
    let masks = format!("learned/{key}/masks.json");
    let masks = if opts.output.join(&masks).is_file() { masks } else { String::new() };
    Ok((model, after, before.unwrap_or(f64::NAN), masks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_take_the_most_accurate_point_under_each_once() {
        // (cost, accuracy)
        let points = [(0.0, 0.1), (10.0, 0.5), (20.0, 0.7), (30.0, 0.65), (50.0, 0.9)];
        assert_eq!(best_under_levels(&points, &[60.0, 25.0, 5.0]), vec![0, 2, 4]);
        // 30 is cheaper than 50 but less accurate than 20, so level 35 takes 20; two levels on
        // the same point train it once; a level under every point takes nothing.
        assert_eq!(best_under_levels(&points, &[35.0, 22.0, -1.0]), vec![2]);
        let tie = [(10.0, 0.5), (20.0, 0.5)];
        assert_eq!(best_under_levels(&tie, &[30.0]), vec![0], "ties go to the cheaper point");
    }
}
