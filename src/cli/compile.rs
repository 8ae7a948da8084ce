//! `relucompile in.onnx -o out.onnx`: flags into [`CompileOptions`], the compile driver
//! ([`crate::driver::compile`]), then the report printed and the model written.

use crate::analysis::census::Census;
use crate::driver::compile::{compile, CompileOptions, CompileReport, ThinMode as Thin};
use crate::eval::compare::Comparison;
use crate::frontend::write_bytes_atomic;
use crate::passes::DEFAULT_PIPELINE;
use crate::report::{table, thousands};
use crate::search::objective::Budget;
use anyhow::{Context, Result};
use std::path::PathBuf;

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
    /// Input shape: one sample as `inspect` prints it (3x32x32) or with the batch (1x3x32x32)
    /// [default: the model's declared shape]
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
    /// Calibration images drawn from the training split of --data: recalibration and
    /// --channel-threshold fit on the first half (at most 512), a budget search scores its
    /// candidates on the rest
    #[arg(long, default_value_t = 1024, help_heading = "ReLU reduction (lossy)")]
    pub calibration_images: usize,
    /// Seed of the calibration draw (the same as `pareto --seed` reproduces its points)
    #[arg(long, default_value_t = 0, help_heading = "ReLU reduction (lossy)")]
    pub seed: u64,
    /// Pick the culling/thinning/channel combination that meets this ReLU budget (a count or
    /// a percentage like 25%) with the least accuracy loss on calibration images
    #[arg(long, group = "budget", help_heading = "ReLU reduction (lossy)", conflicts_with_all = ["cull", "thin", "channel_threshold"])]
    pub relu_budget: Option<String>,
    /// Pick the combination (max-pool replacement included) whose estimated PI bytes per image
    /// meet this budget, e.g. 30MB or 25%, with the least accuracy loss
    #[arg(long, group = "budget", value_name = "BYTES", help_heading = "ReLU reduction (lossy)", conflicts_with_all = ["cull", "thin", "channel_threshold"])]
    pub bytes_budget: Option<String>,
    /// The same for estimated PI latency per image, e.g. 0.3s, 300ms or 25%
    #[arg(long, group = "budget", value_name = "SECONDS", help_heading = "ReLU reduction (lossy)", conflicts_with_all = ["cull", "thin", "channel_threshold"])]
    pub latency_budget: Option<String>,
    /// With a budget: take the most accurate point under it from a frontier that
    /// `relucompile pareto` wrote (its directory or frontier.json) instead of searching
    #[arg(long, requires = "budget", help_heading = "ReLU reduction (lossy)")]
    pub frontier: Option<PathBuf>,
    /// With a budget: rank the 4 candidates most accurate after the refit again by the
    /// calibration accuracy a one-epoch distillation on N other training images gives them (at
    /// a quarter of the recipe's learning rate; 0: by their accuracy after the refit)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        requires = "budget",
        conflicts_with = "frontier",
        help_heading = "ReLU reduction (lossy)"
    )]
    pub probe_images: usize,
    /// With a budget: also refit and score the candidates that another candidate under the
    /// budget dominates (it keeps every ReLU they keep, and more). Skipped by default: on the
    /// shipped ResNet scoring them all chose the same rewrite in three times the time
    #[arg(
        long,
        requires = "budget",
        conflicts_with = "frontier",
        help_heading = "ReLU reduction (lossy)"
    )]
    pub score_dominated: bool,
    /// Do not recalibrate after lossy passes (by default every Conv/Gemm is refitted by least
    /// squares to the original's output on calibration images, in its own weights)
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
    #[command(flatten)]
    pub reporting: super::output_flags::OutputFlags,
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

impl From<ThinMode> for Thin {
    fn from(mode: ThinMode) -> Self {
        match mode {
            ThinMode::Bottom => Thin::Bottom,
            ThinMode::Top => Thin::Top,
            ThinMode::Alternate => Thin::Alternate,
        }
    }
}

impl CompileArgs {
    /// The driver's options; fails when the input or the output is missing.
    pub fn options(&self) -> Result<CompileOptions> {
        Ok(CompileOptions {
            input: self.input.clone().context("no input model given")?,
            output: self.output.clone().context("no output path given (-o out.onnx)")?,
            passes: self.passes.clone(),
            input_shape: self.input_shape.clone(),
            verify_each: self.verify_each,
            force: self.force,
            check_data: self.check_data.clone(),
            cull: self.cull.clone(),
            thin: self.thin.map(Thin::from),
            thin_stages: self.thin_stages.clone(),
            channel_threshold: self.channel_threshold,
            resolution: self.resolution,
            width: self.width,
            avg_pool: self.avg_pool,
            calibration_images: self.calibration_images,
            seed: self.seed,
            relu_budget: self.relu_budget.clone(),
            bytes_budget: self.bytes_budget.clone(),
            latency_budget: self.latency_budget.clone(),
            frontier: self.frontier.clone(),
            recalibrate: !self.no_recalibrate,
            data: self.data.clone(),
            evaluate: !self.no_eval,
            max_drop: self.max_drop,
            limit: self.limit,
            cost_model: self.cost_model.clone(),
            progress: self.reporting.progress(),
            data_options: (&self.data_flags).into(),
            finetune: self.finetune.training(),
            probe_images: self.probe_images,
            score_dominated: self.score_dominated,
        })
    }
}

pub fn run(args: &CompileArgs) -> Result<()> {
    let compiled = compile(&args.options()?)?;
    let report = &compiled.report;
    if args.reporting.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print_report(report, &compiled.census_before, &compiled.census_after, &compiled.check_note);
    }
    if let Some(path) = &args.report {
        write_bytes_atomic(path, serde_json::to_string_pretty(report)?.as_bytes())?;
    }
    if let Some(warning) = report.accuracy.as_ref().and_then(|a| a.warning.as_ref()) {
        eprintln!("WARNING: {warning}");
    }
    if let Some(warning) = &report.cost_after.warning {
        eprintln!("warning: {warning}");
    }
    if let Some(warning) = report.finetune.as_ref().and_then(|f| f.warning.as_ref()) {
        eprintln!("warning: {warning}");
    }
    if let Some(warning) = &report.accuracy_not_measured {
        eprintln!("warning: {warning}");
    }
    compiled.write()?;
    if !args.reporting.json {
        println!("wrote {}", compiled.output().display());
    }
    Ok(())
}

fn print_report(r: &CompileReport, before: &Census, after: &Census, real_note: &str) {
    println!("{} -> {}", r.input, r.output);
    println!("pipeline: {}\n", r.pipeline);
    if let Some(b) = &r.budget {
        let budget = Budget { objective: b.objective, limit: b.limit };
        println!(
            "budget {}: chose '{}' ({} ReLUs, est. {:.1} MB, {:.3} s; {:.2}% on calibration images{}) among {} candidates\n",
            budget.describe(),
            b.chosen.pipeline,
            thousands(b.chosen.relus),
            b.chosen.bytes / 1e6,
            b.chosen.seconds,
            100.0 * b.chosen.calibration_accuracy.unwrap_or(f64::NAN),
            match b.chosen.probe_accuracy {
                Some(p) => format!(", {:.2}% after its recovery probe", 100.0 * p),
                None => String::new(),
            },
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
        println!("  inputs {}  ({})", a.normalisation, a.normalisation.source.describe());
    }
}
