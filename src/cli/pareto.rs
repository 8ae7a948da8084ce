//! `relucompile pareto`: the frontier of networks trading ReLUs against accuracy.

use crate::analysis::census::census;
use crate::analysis::shapes::sample_shape;
use crate::analysis::stages::residual_adds;
use crate::error::{CompileError, ExitCode};
use crate::eval::data;
use crate::frontend::{load_model, write_bytes_atomic, write_model_atomic};
use crate::passes::{prepare, run_pipeline, PassContext, Pipeline, VerifyOptions};
use crate::report::plot::{frontier_plot, PlotPoint};
use crate::report::{table, thousands};
use crate::search::criticality::criticality;
use crate::search::pareto::{frontier_indices, score_all};
use crate::search::{accuracy, build_candidate};
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Input shape with batch, e.g. 1x3x32x32 (default: the model's declared shape)
    #[arg(long, value_parser = super::parse_shape)]
    pub input_shape: Option<::std::vec::Vec<usize>>,
    /// Score candidates without recalibrating them to the original's channel statistics
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
    /// No progress bars
    #[arg(long)]
    pub no_progress: bool,
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

#[derive(Serialize)]
struct FrontierPoint {
    relus: u64,
    accuracy: f64,
    /// With --finetune-epochs: the test accuracy before fine-tuning (`accuracy` is after).
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy_before_finetune: Option<f64>,
    calibration_accuracy: f64,
    file: String,
    config: String,
}

#[derive(Serialize)]
struct Frontier {
    model: String,
    seed: u64,
    calibration_images: usize,
    test_images: usize,
    original: OriginalPoint,
    cull_order: Vec<usize>,
    candidates: usize,
    points: Vec<FrontierPoint>,
}

#[derive(Serialize)]
struct OriginalPoint {
    relus: u64,
    accuracy: f64,
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

pub fn run(args: &ParetoArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let progress = !args.no_progress;
    let original = load_model(&args.model)?;
    let sample = sample_shape(&original, args.input_shape.as_deref())?;
    let ctx = PassContext::new(sample.clone());
    let base = prepare(&original, &ctx)?;

    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create the output directory {}", args.output.display()))?;
    let key = SearchKey {
        model_fnv64: fnv64(&std::fs::read(&args.model)?),
        seed: args.seed,
        calibration_images: args.calibration_images,
        data: match args.data_flags.describe() {
            flags if flags.is_empty() => args.data.clone(),
            flags => format!("{} {flags}", args.data),
        },
        recalibrate: !args.no_recalibrate,
        dimensions: !args.no_dimensions,
    };
    check_resume(&args.output, &key)?;

    let name = args.model.display().to_string();
    let train =
        args.data_flags.load(&args.data, data::Split::Train, None, &original, &sample, &name)?;
    let calibration = train.seeded_subset(args.calibration_images, args.seed);
    drop(train);
    let mut ctx =
        PassContext::with_data(sample.clone(), Arc::new(calibration.images.clone()), &base);
    if args.no_recalibrate {
        ctx.reference = None;
    }

    let crit_path = args.output.join("criticality.json");
    let crit = match std::fs::read_to_string(&crit_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        Some(v) => serde_json::from_value::<Vec<usize>>(v["cull_order"].clone())?,
        None => {
            let c = criticality(&base, &ctx, &calibration)?;
            write_bytes_atomic(&crit_path, serde_json::to_string_pretty(&c)?.as_bytes())?;
            c.cull_order
        }
    };
    let shapes = crate::analysis::shapes::infer_shapes(&base, &sample, 1)?;
    let residual = !residual_adds(&base.graph, &shapes).is_empty();
    // The dimension knobs enter the search where the graph takes them.
    let knobs: Vec<&str> = if args.no_dimensions {
        vec![]
    } else {
        crate::search::pareto::DIMENSION_KNOBS
            .iter()
            .copied()
            .filter(|k| build_candidate(&base, k, &PassContext::new(sample.clone())).is_ok())
            .collect()
    };
    let scored = score_all(
        &base,
        &crit,
        residual,
        &knobs,
        args.cull_search == CullSearch::Subsets,
        &ctx,
        &calibration,
        &args.output.join("candidates.jsonl"),
        progress,
    )?;

    // Frontier on calibration data, then each of its points measured once on the test split.
    let calib_points: Vec<(u64, f64)> =
        scored.iter().map(|s| (s.relus, s.calibration_accuracy)).collect();
    let chosen: Vec<&crate::search::pareto::Scored> =
        frontier_indices(&calib_points).into_iter().map(|i| &scored[i]).collect();
    let test = args.data_flags.load(
        &args.data,
        data::Split::Test,
        args.test_limit,
        &original,
        &sample,
        &name,
    )?;
    let measured: Vec<(crate::ir::Model, u64, f64)> = chosen
        .par_iter()
        .map(|s| {
            let (m, _) = build_candidate(&base, &s.config, &ctx)?;
            let mut m = m;
            run_pipeline(
                &mut m,
                &Pipeline::parse(crate::passes::DEFAULT_PIPELINE)?,
                &ctx,
                &VerifyOptions::default(),
            )?;
            let relus = census(&m, &sample)?.total_relus;
            let acc = accuracy(&m, &test)?;
            Ok((m, relus, acc))
        })
        .collect::<Result<_>>()?;
    let test_points: Vec<(u64, f64)> = measured.iter().map(|(_, r, a)| (*r, *a)).collect();
    let mut points = Vec::new();
    for (k, i) in frontier_indices(&test_points).into_iter().enumerate() {
        let (model, relus, acc) = &measured[i];
        let file = format!("point-{k:02}.onnx");
        // Fine-tuning runs on every core, so the points take their turn.
        let (model, acc, before) = if args.finetune.finetune_epochs > 0 {
            let (tuned, report) = super::finetune::finetune_model(
                model,
                &original,
                (&args.data, &args.data_flags),
                &args.finetune.train_flags(),
                args.finetune.finetune_epochs,
                args.test_limit,
                progress,
            )
            .with_context(|| format!("fine-tuning frontier point {file}"))?;
            (tuned, report.accuracy_after, Some(*acc))
        } else {
            (model.clone(), *acc, None)
        };
        write_model_atomic(&args.output.join(&file), &model)?;
        points.push(FrontierPoint {
            relus: *relus,
            accuracy: acc,
            accuracy_before_finetune: before,
            calibration_accuracy: chosen[i].calibration_accuracy,
            file,
            config: label(&chosen[i].config),
        });
    }
    // Points of an earlier, interrupted or different run must not linger beside this frontier.
    let written: Vec<&str> = points.iter().map(|p| p.file.as_str()).collect();
    for entry in std::fs::read_dir(&args.output)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("point-")
            && name.ends_with(".onnx")
            && !written.contains(&name.as_str())
        {
            std::fs::remove_file(entry.path())?;
        }
    }
    let original_relus = census(&original, &sample)?.total_relus;
    let original_acc = accuracy(&original, &test)?;
    let frontier = Frontier {
        model: args.model.display().to_string(),
        seed: args.seed,
        calibration_images: calibration.len(),
        test_images: test.len(),
        original: OriginalPoint { relus: original_relus, accuracy: original_acc },
        cull_order: crit,
        candidates: scored.len(),
        points,
    };
    write_outputs(&args.output, &frontier)?;
    print_frontier(&frontier);
    println!(
        "search took {:.1}s; wrote {}",
        started.elapsed().as_secs_f64(),
        args.output.display()
    );
    Ok(())
}

fn check_resume(dir: &Path, key: &SearchKey) -> Result<()> {
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
        Err(_) => write_bytes_atomic(&path, serde_json::to_string_pretty(key)?.as_bytes()),
    }
}

fn write_outputs(dir: &Path, f: &Frontier) -> Result<()> {
    write_bytes_atomic(
        &dir.join("frontier.json"),
        (serde_json::to_string_pretty(f)? + "\n").as_bytes(),
    )?;
    let mut csv = String::from("relus,accuracy,calibration_accuracy,file,config\n");
    for p in &f.points {
        csv += &format!(
            "{},{:.4},{:.4},{},\"{}\"\n",
            p.relus, p.accuracy, p.calibration_accuracy, p.file, p.config
        );
    }
    write_bytes_atomic(&dir.join("frontier.csv"), csv.as_bytes())?;
    let mut md = format!(
        "# ReLU/accuracy frontier of {}\n\nOriginal: {} ReLUs, {:.2}% on {} test images.\n\n\
         | ReLUs | test accuracy | calibration accuracy | configuration | file |\n|---:|---:|---:|---|---|\n",
        f.model,
        thousands(f.original.relus),
        100.0 * f.original.accuracy,
        f.test_images
    );
    for p in &f.points {
        md += &format!(
            "| {} | {:.2}% | {:.2}% | `{}` | {} |\n",
            thousands(p.relus),
            100.0 * p.accuracy,
            100.0 * p.calibration_accuracy,
            p.config,
            p.file
        );
    }
    write_bytes_atomic(&dir.join("frontier.md"), md.as_bytes())?;
    let plot_points: Vec<PlotPoint> = f
        .points
        .iter()
        .map(|p| PlotPoint { relus: p.relus, accuracy: p.accuracy, label: p.config.clone() })
        .collect();
    let original = PlotPoint {
        relus: f.original.relus,
        accuracy: f.original.accuracy,
        label: "original".into(),
    };
    frontier_plot(
        &dir.join("frontier"),
        &format!("ReLU/accuracy frontier: {}", f.model),
        &original,
        &plot_points,
    )
}

fn print_frontier(f: &Frontier) {
    println!(
        "{}: {} candidates scored on {} calibration images; cull order {:?}",
        f.model, f.candidates, f.calibration_images, f.cull_order
    );
    let mut rows = vec![vec![
        "original".to_string(),
        thousands(f.original.relus),
        format!("{:.2}%", 100.0 * f.original.accuracy),
        String::new(),
    ]];
    rows.extend(f.points.iter().map(|p| {
        vec![
            p.config.clone(),
            thousands(p.relus),
            format!("{:.2}%", 100.0 * p.accuracy),
            p.file.clone(),
        ]
    }));
    print!("{}", table(&["configuration", "relus", "test accuracy", "file"], &rows));
}
