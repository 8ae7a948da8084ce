//! The command line: `relucompile in.onnx -o out.onnx`, and the subcommands, each a thin layer
//! over its driver; every `--help` ends with the exit codes.

mod compile;
mod criticality;
pub mod data_flags;
mod eval;
pub mod finetune;
mod inspect;
mod linearize;
mod output_flags;
mod pareto;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  internal error or I/O failure
  2  bad command-line usage
  3  the input model is invalid (not ONNX, truncated, inconsistent graph)
  4  the model uses a construct relucompile does not support (control flow, unknown op)
  5  a lossless rewrite changed the outputs; nothing was written
  6  the data set cannot be read or does not fit the model
  7  the accuracy gate failed; nothing was written
  8  the pixel normalisation is unstated, or the original scores near chance on the data";

#[derive(Parser, Debug)]
#[command(
    name = "relucompile",
    version,
    about = "A ReLU-reduction compiler for private inference",
    long_about = "relucompile reads a trained network as ONNX, rewrites it to need fewer ReLUs \
                  (each ReLU costs a comparison protocol in private inference), checks the \
                  rewritten graph against the original under tract, and writes it as ONNX.\n\n\
                  Without a subcommand it compiles: relucompile in.onnx -o out.onnx",
    after_help = EXIT_CODES_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    compile: compile::CompileArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Rewrite a model (the same as giving no subcommand)
    #[command(after_help = EXIT_CODES_HELP)]
    Compile(Box<compile::CompileArgs>),
    /// Print the ReLU census: every ReLU layer with its stage, shape and count, and MACs
    #[command(after_help = EXIT_CODES_HELP)]
    Inspect(inspect::InspectArgs),
    /// Measure top-1 accuracy and throughput (native engine, tract for graphs it does not take)
    #[command(after_help = EXIT_CODES_HELP)]
    Eval(eval::EvalArgs),
    /// Per-stage ReLU criticality (DeepReDuce) on calibration images, and the cull order
    #[command(after_help = EXIT_CODES_HELP)]
    Criticality(criticality::CriticalityArgs),
    /// Search the Pareto frontier of ReLUs (or estimated PI bytes or latency) against accuracy
    /// and write one model per point
    #[command(after_help = EXIT_CODES_HELP)]
    Pareto(pareto::ParetoArgs),
    /// Fine-tune a reduced graph by knowledge distillation from the original (BatchNorm
    /// re-inserted, SGD with Nesterov momentum and a one-cycle schedule; crops and flips on
    /// request), checkpointing every epoch
    #[command(after_help = EXIT_CODES_HELP)]
    Finetune(finetune::FinetuneArgs),
    /// Learn per-channel ReLU masks to a ReLU budget with the weights, under distillation
    /// (beyond DeepReDuce's whole-stage culling), and write the graph with ReLUs only on the
    /// kept channels
    #[command(after_help = EXIT_CODES_HELP)]
    Linearize(linearize::LinearizeArgs),
    /// List every pass a pipeline (--passes) can name
    #[command(after_help = EXIT_CODES_HELP)]
    Passes(PassesArgs),
    /// Run a model under tract on inputs from a .npy file and write its outputs as .npy
    #[command(after_help = EXIT_CODES_HELP)]
    Run(run::RunArgs),
}

pub fn main() -> Result<()> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    match cli.command {
        Some(Command::Compile(args)) => compile::run(&args),
        Some(Command::Inspect(args)) => inspect::run(&args),
        Some(Command::Eval(args)) => eval::run(&args),
        Some(Command::Run(args)) => run::run(&args),
        Some(Command::Criticality(args)) => criticality::run(&args),
        Some(Command::Pareto(args)) => pareto::run(&args),
        Some(Command::Finetune(args)) => finetune::run(&args),
        Some(Command::Linearize(args)) => linearize::run(&args),
        Some(Command::Passes(args)) => print_passes(&args),
        None => compile::run(&cli.compile),
    }
}

#[derive(clap::Args, Debug)]
struct PassesArgs {
    /// Print the passes as one JSON object instead of a table
    #[arg(long)]
    json: bool,
}

fn print_passes(args: &PassesArgs) -> Result<()> {
    if args.json {
        let passes: Vec<serde_json::Value> = crate::passes::REGISTRY
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "lossless": p.lossless,
                    "phase": format!("{:?}", p.phase).to_lowercase(),
                    "description": p.description,
                })
            })
            .collect();
        let out = serde_json::json!({
            "passes": passes,
            "default_pipeline": crate::passes::DEFAULT_PIPELINE,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = crate::passes::REGISTRY
        .iter()
        .map(|p| {
            vec![
                p.name.to_string(),
                if p.lossless { "lossless" } else { "lossy" }.to_string(),
                p.description.to_string(),
            ]
        })
        .collect();
    print!("{}", crate::report::table(&["pass", "kind", "what it does"], &rows));
    println!("\ndefault pipeline: {}", crate::passes::DEFAULT_PIPELINE);
    Ok(())
}

/// Parse `1x3x32x32` (also `1,3,32,32`). Fields holding the result are typed
/// `Option<::std::vec::Vec<usize>>`: spelled that way, clap takes the shape as one value
/// rather than a list of them.
pub fn parse_shape(text: &str) -> Result<Vec<usize>, String> {
    let dims: Result<Vec<usize>, _> =
        text.split(['x', 'X', ',']).map(|d| d.trim().parse::<usize>()).collect();
    match dims {
        Ok(d) if !d.is_empty() && d.iter().all(|&v| v > 0) => Ok(d),
        _ => Err(format!("'{text}' is not a shape like 1x3x32x32 (positive integers)")),
    }
}

/// A clap value parser over a library enum's words, each with its help: `--help` lists them
/// and a bad word exits 2 naming the flag, while the library's types stay free of clap.
pub(crate) fn words<T>(
    words: &'static [(&'static str, &'static str)],
) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr<Err = String> + Clone + Send + Sync + 'static,
{
    use clap::builder::{PossibleValue, TypedValueParser};
    let values = words.iter().map(|&(word, help)| PossibleValue::new(word).help(help));
    clap::builder::PossibleValuesParser::new(values).try_map(|word| word.parse::<T>())
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks (duplicate flags across flattened groups, bad defaults),
    /// which otherwise run only when a debug build parses a command line.
    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// The names made one across subcommands keep their old spellings as hidden aliases.
    #[test]
    fn renamed_flags_keep_their_old_names() {
        use clap::Parser;
        let parse = |args: &[&str]| super::Cli::try_parse_from(args).map(|c| format!("{c:?}"));
        let cases: [(&[&str], &[&str]); 3] = [
            (
                &["relucompile", "pareto", "m.onnx", "-o", "d", "--limit", "7"],
                &["relucompile", "pareto", "m.onnx", "-o", "d", "--test-limit", "7"],
            ),
            (
                &["relucompile", "m.onnx", "-o", "o.onnx", "--train-limit", "7"],
                &["relucompile", "m.onnx", "-o", "o.onnx", "--finetune-train-limit", "7"],
            ),
            (
                &["relucompile", "criticality", "m.onnx", "--calibration-images", "7", "--json"],
                &["relucompile", "criticality", "m.onnx", "--images", "7", "--json"],
            ),
        ];
        for (new, old) in cases {
            let (a, b) = (parse(new).unwrap(), parse(old).unwrap());
            assert_eq!(a, b);
            assert!(a.contains("Some(7)") || a.contains("images: 7"), "{a}");
        }
    }

    /// Every subcommand's --help ends with the exit codes.
    #[test]
    fn every_help_lists_the_exit_codes() {
        use clap::CommandFactory;
        let mut cli = super::Cli::command();
        for sub in cli.get_subcommands_mut() {
            let help = sub.render_long_help().to_string();
            assert!(
                help.contains("Exit codes:")
                    && help.contains("7  the accuracy gate")
                    && help.contains("8  the pixel normalisation"),
                "{help}"
            );
            // Every command prints its report as JSON on request.
            assert!(help.contains("--json"), "{} has no --json", sub.get_name());
        }
    }
}
