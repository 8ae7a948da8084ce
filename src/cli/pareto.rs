//! `relucompile pareto`: flags into [`ParetoOptions`], the frontier search
//! ([`crate::driver::pareto`]), then the frontier printed.

use super::linearize::GRANULARITIES;
use crate::driver::pareto::{pareto, pareto_shard, Frontier, ParetoOptions, ShardReport};
use crate::driver::shard::Shard;
use crate::report::{table, thousands};
use crate::search::objective::Objective;
use crate::train::masks::Granularity;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ParetoArgs {
    /// The ONNX model to reduce
    pub model: PathBuf,
    /// Output directory: one ONNX file per frontier point, frontier.json/.csv/.md/.svg/.png
    #[arg(short, long)]
    pub output: PathBuf,
    /// Data set (`fashion-mnist`, an IDX, CIFAR or image-folder directory, or a .npy file)
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Calibration images drawn (by --seed) from the training split to choose candidates
    #[arg(long, default_value_t = 2000)]
    pub calibration_images: usize,
    /// Seed of the calibration draw; the same seed gives the same frontier
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Measure the frontier on the first N test images only (default: the whole test split)
    #[arg(long = "limit", value_name = "N", alias = "test-limit")]
    pub test_limit: Option<usize>,
    /// Input shape: one sample as `inspect` prints it (3x32x32) or with the batch (1x3x32x32)
    /// [default: the model's declared shape]
    #[arg(long, value_parser = super::parse_shape)]
    pub input_shape: Option<::std::vec::Vec<usize>>,
    /// Score candidates without recalibrating them to the original's outputs
    #[arg(long)]
    pub no_recalibrate: bool,
    /// Which stage sets are culled: every subset (small networks) or only prefixes of the
    /// criticality order (least critical first; much faster)
    #[arg(long, value_enum, default_value_t = CullSearch::Subsets)]
    pub cull_search: CullSearch,
    /// Leave the half-resolution and half-width candidates (`resolution(0.5)`, `width(0.5)`)
    /// out of the search
    #[arg(long)]
    pub no_dimensions: bool,
    /// The cost on the frontier's axis: ReLUs, or the PI bytes or latency per image the cost
    /// model estimates (bytes and latency also try replacing max-pooling with averaging)
    #[arg(long, value_enum, default_value_t = Objective::Relus)]
    pub objective: Objective,
    /// PI cost model for the bytes and latency estimates: `crypten` (built in) or a JSON file
    #[arg(long, default_value = "crypten", value_name = "MODEL")]
    pub cost_model: String,
    /// With --finetune-epochs: train only the most accurate frontier point at or under each of
    /// these cost levels (shares of the original's cost, or counts and units as for budgets)
    #[arg(long, value_name = "LEVEL,...", value_delimiter = ',',
          default_values_t = crate::driver::pareto::DEFAULT_FINETUNE_LEVELS.iter().map(|l| l.to_string()))]
    pub finetune_levels: Vec<String>,
    /// Draw and tabulate another method's points beside the frontier: a JSON file with
    /// `points` (`label`, `accuracy`, and `relus`, `bytes` or `seconds`) and an optional `name`,
    /// such as docs/deepreduce_reference.json
    #[arg(long, value_name = "FILE")]
    pub reference: Option<PathBuf>,
    /// Also put learned ReLU masks on the frontier, one point per budget (`--learned
    /// 25%,10%,5%`): `relucompile linearize` with one mask epoch, then the distillation of
    /// --finetune-epochs (one epoch without it)
    #[arg(long, value_name = "N|P%,...", value_delimiter = ',')]
    pub learned: Vec<String>,
    /// The learned points' masks: per channel or per pixel (see `relucompile linearize --help`)
    #[arg(long, default_value = "channel", value_parser = super::words::<Granularity>(GRANULARITIES))]
    pub learned_granularity: Granularity,
    /// Rank the candidates near the frontier by the calibration accuracy they reach after a
    /// one-epoch distillation probe on N training images, at a quarter of the recipe's
    /// learning rate (0: by their accuracy after recalibration; 8192 is a useful N)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub probe_images: usize,
    /// Run shard I (from 0) of N: score every candidate, train every N-th of the points to
    /// train, into the shared -o directory; `--merge` then writes the frontier [default: from
    /// SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, or JOB_COMPLETION_INDEX with --shards]
    #[arg(long, value_name = "I/N", conflicts_with_all = ["merge", "shards"])]
    pub shard: Option<Shard>,
    /// The shard count, when the scheduler gives only the index (a Kubernetes Indexed Job's
    /// JOB_COMPLETION_INDEX)
    #[arg(long, value_name = "N", conflicts_with = "merge")]
    pub shards: Option<usize>,
    /// Write the frontier from the points the shards trained into -o (the same files as a
    /// search in one process; exit 9 names any shard not finished). Give the shards' flags
    #[arg(long)]
    pub merge: bool,
    #[command(flatten)]
    pub reporting: super::output_flags::OutputFlags,
    #[command(flatten)]
    pub data_flags: super::data_flags::DataFlags,
    #[command(flatten)]
    pub finetune: super::finetune::FinetuneFlags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CullSearch {
    Subsets,
    Prefixes,
}

impl From<&ParetoArgs> for ParetoOptions {
    fn from(a: &ParetoArgs) -> Self {
        ParetoOptions {
            model: a.model.clone(),
            output: a.output.clone(),
            data: a.data.clone(),
            calibration_images: a.calibration_images,
            seed: a.seed,
            test_limit: a.test_limit,
            input_shape: a.input_shape.clone(),
            recalibrate: !a.no_recalibrate,
            dimensions: !a.no_dimensions,
            exhaustive_culls: a.cull_search == CullSearch::Subsets,
            progress: a.reporting.progress(),
            data_options: (&a.data_flags).into(),
            finetune: a.finetune.training(),
            probe_images: a.probe_images,
            finetune_levels: a.finetune_levels.clone(),
            learned: a.learned.clone(),
            learned_granularity: a.learned_granularity,
            reference: a.reference.clone(),
            objective: a.objective,
            cost_model: a.cost_model.clone(),
            merge: a.merge,
        }
    }
}

pub fn run(args: &ParetoArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let shard = match (args.shard, args.merge) {
        (Some(s), _) => Some(s),
        (None, true) => None,
        (None, false) => Shard::from_environment(args.shards)?.map(|(s, from)| {
            eprintln!("note: running shard {s} of the search (from {from})");
            s
        }),
    };
    if let Some(shard) = shard {
        let report = pareto_shard(&args.into(), shard)?;
        if args.reporting.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_shard(&report, args);
        }
        return Ok(());
    }
    let frontier = pareto(&args.into())?;
    if let Some(w) = &frontier.cost_warning {
        eprintln!("warning: {w}");
    }
    if args.reporting.json {
        println!("{}", serde_json::to_string_pretty(&frontier)?);
        return Ok(());
    }
    print_frontier(&frontier);
    println!(
        "search took {:.1}s; wrote {}",
        started.elapsed().as_secs_f64(),
        args.output.display()
    );
    Ok(())
}

fn print_shard(r: &ShardReport, args: &ParetoArgs) {
    let share = if r.trained.is_empty() {
        "no point of its own".to_string()
    } else {
        format!(
            "{} of the {} points to train ({})",
            r.trained.len(),
            r.points_to_train,
            r.trained.join(", ")
        )
    };
    println!("shard {} took {:.1}s: scored the candidates, trained {share}", r.shard, r.seconds);
    println!(
        "when every shard is done: relucompile pareto {} -o {} <the same flags> --merge",
        args.model.display(),
        args.output.display()
    );
}

fn print_frontier(f: &Frontier) {
    println!(
        "{}: {} candidates scored on {} calibration images; cull order {:?}",
        f.model, f.candidates, f.calibration_images, f.cull_order
    );
    if let Some(n) = &f.normalisation {
        println!("inputs {n}  ({})", n.source.describe());
    }
    if f.probe_images > 0 {
        println!(
            "{} candidates near the frontier ranked after a distillation probe on {} training images",
            f.probed, f.probe_images
        );
    }
    let row = |config: &str, relus: u64, bytes: f64, seconds: f64, acc: f64, file: &str| {
        vec![
            config.to_string(),
            thousands(relus),
            format!("{:.1}", bytes / 1e6),
            format!("{seconds:.3}"),
            format!("{:.2}%", 100.0 * acc),
            file.to_string(),
        ]
    };
    let o = &f.original;
    let mut rows = vec![row("original", o.relus, o.bytes, o.seconds, o.accuracy, "")];
    rows.extend(
        f.points.iter().map(|p| row(&p.config, p.relus, p.bytes, p.seconds, p.accuracy, &p.file)),
    );
    print!(
        "{}",
        table(&["configuration", "relus", "est. MB", "est. s", "test accuracy", "file"], &rows)
    );
    for p in f.learned.iter().filter(|p| p.file.is_empty()) {
        println!(
            "{}: {} ReLUs, {:.2}%, dominated by a point above",
            p.config,
            thousands(p.relus),
            100.0 * p.accuracy
        );
    }
}
