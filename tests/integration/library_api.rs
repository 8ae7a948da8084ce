//! The build steps driven through the library (`relucompile::driver`), not the binary: the
//! same ReLU counts, the same report and the same bytes written as the command line.

use crate::common::*;
use relucompile::driver::compile::{compile, CompileOptions, ThinMode};
use relucompile::driver::eval::{eval, EvalOptions};

const MODEL: &str = "models/resnet18w16.onnx";
const LIMIT: usize = 200;

#[test]
fn compile_and_eval_through_the_api_match_the_command_line() {
    // Integration tests run in the package root, as the command line below does.
    let dir = tmpdir();
    let out = dir.path().join("out.onnx");
    let api_out = dir.path().join("api.onnx");

    let options = CompileOptions {
        cull: vec![1, 2],
        thin: Some(ThinMode::Bottom),
        limit: Some(LIMIT),
        ..CompileOptions::new(MODEL, &out)
    };
    let compiled = compile(&options).unwrap();
    let report = &compiled.report;
    assert_eq!(report.before.total_relus, 108_544);
    assert_eq!(report.after.total_relus, 22_912);
    assert_eq!(report.after.stages, vec![12_544, 0, 0, 6_272, 4_096]);
    assert!(report.lossy);
    assert_eq!(compiled.census_after.total_relus, 22_912);
    let accuracy = report.accuracy.as_ref().expect("a lossy compile measures accuracy");
    assert_eq!(accuracy.images, LIMIT);
    assert!(!out.exists(), "compile() writes nothing by itself");
    compiled.write().unwrap();
    std::fs::rename(&out, &api_out).unwrap();

    // The command line with the same options and output path: the same JSON, byte for byte,
    // and the same model bytes.
    let cli = relucompile(&[
        MODEL,
        "-o",
        out.to_str().unwrap(),
        "--cull",
        "1,2",
        "--thin",
        "bottom",
        "--limit",
        &LIMIT.to_string(),
        "--json",
    ]);
    assert_eq!(cli.code, 0, "{}", cli.stderr);
    let api_json = serde_json::to_string_pretty(report).unwrap() + "\n";
    assert!(api_json == cli.stdout, "the API's report differs from the command line's JSON");
    let (a, c) = (std::fs::read(&api_out).unwrap(), std::fs::read(&out).unwrap());
    assert!(a == c, "the API wrote {} bytes, the command line {} different ones", a.len(), c.len());

    // Evaluating the written model through the API gives the accuracy the compile measured.
    let evaluation = eval(&EvalOptions {
        limit: Some(LIMIT),
        reference: Some(MODEL.into()),
        ..EvalOptions::new(&api_out)
    })
    .unwrap();
    let r = &evaluation.report;
    assert_eq!((r.images, r.split.as_str()), (LIMIT, "test"));
    assert_eq!(r.accuracy, accuracy.after);
    let reference = r.reference.as_ref().unwrap();
    assert_eq!((reference.accuracy, reference.agreement), (accuracy.before, accuracy.agreement));
}

#[test]
fn the_accuracy_gate_refuses_to_write_with_exit_7() {
    let dir = tmpdir();
    let out = dir.path().join("gated.onnx");
    let compiled = compile(&CompileOptions {
        cull: vec![1, 2],
        thin: Some(ThinMode::Bottom),
        limit: Some(LIMIT),
        max_drop: Some(0.5),
        recalibrate: false,
        ..CompileOptions::new(path(MODEL), &out)
    })
    .unwrap();
    assert!(!compiled.report.accuracy.as_ref().unwrap().passed);
    let err = compiled.write().unwrap_err();
    assert_eq!(relucompile::error::exit_code_of(&err), relucompile::error::ExitCode::AccuracyGate);
    assert!(!out.exists());
}

#[test]
fn bad_options_keep_their_exit_codes() {
    use relucompile::error::{exit_code_of, ExitCode};
    let dir = tmpdir();
    // The output is a directory: usage (2).
    let err = compile(&CompileOptions::new(path(MODEL), dir.path())).unwrap_err();
    assert_eq!(exit_code_of(&err), ExitCode::Usage);
    // Not ONNX: invalid model (3).
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not a model").unwrap();
    let err = compile(&CompileOptions::new(&junk, dir.path().join("o.onnx"))).unwrap_err();
    assert_eq!(exit_code_of(&err), ExitCode::InvalidModel);
    // Data that does not exist: invalid data (6).
    let err =
        eval(&EvalOptions { data: "/nonexistent/data".into(), ..EvalOptions::new(path(MODEL)) })
            .unwrap_err();
    assert_eq!(exit_code_of(&err), ExitCode::InvalidData);
}
