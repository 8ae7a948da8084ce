//! `relucompile linearize`: learned per-channel and per-pixel ReLU masks to a budget. The
//! written graph meets the budget (counted from the file, by relucompile and by the Python
//! harness), fills it to within one channel (to the ReLU with pixel masks), computes ReLUs only
//! on the kept units, passes onnx.checker and onnxruntime against tract, and repeats byte for
//! byte.

use crate::common::*;
use std::path::Path;

/// 20% of the VGG's 81,792 ReLUs, as `Budget::parse` floors it.
const VGG_BUDGET_20: u64 = 16_358;
/// The VGG's dearest channel: 28x28 ReLUs.
const VGG_LARGEST_CHANNEL: u64 = 784;

fn linearize(out: &Path, budget: &str) -> serde_json::Value {
    linearize_with(out, budget, &[])
}

fn linearize_with(out: &Path, budget: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "linearize",
        "models/vgg.onnx",
        "-o",
        out.to_str().unwrap(),
        "--relu-budget",
        budget,
        "--train-limit",
        "256",
        "--batch",
        "32",
        "--limit",
        "64",
        // The default peak rate overshoots on 8 steps an epoch (a resumed epoch of
        // distillation starts at the peak with fresh momentum and diverged).
        "--lr",
        "0.005",
        "--json",
    ];
    args.extend_from_slice(extra);
    // One epoch of distillation after the mask epoch (the default is 4): what these tests
    // check (the budget, the layout, the harness, repeated bytes) is settled by the mask
    // epoch, and the three more epochs were a fifth of a run (9.9 against 8.1 s).
    if !extra.contains(&"--epochs") {
        args.extend_from_slice(&["--epochs", "1"]);
    }
    relucompile_json(&args)
}

/// `linearize` of the VGG to `out` with `flags`, which must be refused: the exit code and the
/// message.
fn refused(out: &Path, flags: &[&str]) -> (i32, String) {
    let o = relucompile(
        &[&["linearize", "models/vgg.onnx", "-o", out.to_str().unwrap()][..], flags].concat(),
    );
    assert_ne!(o.code, 0, "linearize {flags:?} was accepted");
    (o.code, o.stderr)
}

#[test]
fn the_budget_is_met_from_the_file_and_the_graph_passes_the_harness() {
    let dir = tmpdir();
    let out = dir.path().join("vgg.lin20.onnx");
    let r = linearize(&out, "20%");
    assert_eq!(r["relus_before"], 81_792);
    assert_eq!(r["relu_budget"], VGG_BUDGET_20);
    let after = r["relus_after"].as_u64().unwrap();
    assert!(after <= VGG_BUDGET_20, "{after} ReLUs over the budget");
    assert!(after > VGG_BUDGET_20 - VGG_LARGEST_CHANNEL, "budget not filled: {after}");
    // The layers' decisions add up to the graph's count, and the file says the same.
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 6, "every VGG ReLU carries a mask");
    let by_layers: u64 = layers
        .iter()
        .map(|l| l["kept"].as_array().unwrap().len() as u64 * l["relus_per_unit"].as_u64().unwrap())
        .sum();
    assert_eq!(by_layers, after);
    let census = relucompile_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(census["total_relus"].as_u64(), Some(after));
    assert_eq!(r["finetune"]["relus"].as_u64(), Some(after));
    assert!(r["finetune"]["written_graph_rel_diff"].as_f64().unwrap() <= 1e-3);
    // Masks started at 1 and a penalty pulled them down; none rose above 1.
    for l in layers {
        let m = l["mean_mask"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&m), "mean mask {m} of {}", l["relu"]);
    }
    passes_the_harness_and_repeats(dir.path(), &out, after, &[]);
}

/// `out`, written by `linearize_with(out, "20%", flags)` with `relus` ReLUs, passes the Python
/// harness (onnx.checker, onnxruntime against tract, the ReLUs recounted), and the same flags
/// write the same bytes again.
fn passes_the_harness_and_repeats(dir: &Path, out: &Path, relus: u64, flags: &[&str]) {
    if python_ready(&["onnx", "onnxruntime", "numpy"]) {
        let real = path("fixtures/images/fmnist_test_64.npy");
        let mut case = tract_case(out, &real, &dir.join("y.npy"));
        case["relus"] = serde_json::json!(relus);
        cross_check(dir, &[case]);
    }
    let again = dir.join("again.onnx");
    linearize_with(&again, "20%", flags);
    assert_eq!(std::fs::read(out).unwrap(), std::fs::read(&again).unwrap());
}

/// ReLU layers left in the graph, from `inspect --json`'s stages.
fn relu_layers(census: &serde_json::Value) -> u64 {
    census["stages"].as_array().unwrap().iter().map(|s| s["relu_layers"].as_u64().unwrap()).sum()
}

/// Pixel masks: every unit is one ReLU, so the budget is met exactly; the kept positions of
/// each layer run as one Relu (no more Relu nodes than layers), and the graph passes the
/// harness and repeats byte for byte.
#[test]
fn pixel_masks_meet_the_budget_exactly_with_one_dense_relu_per_layer() {
    let dir = tmpdir();
    let out = dir.path().join("vgg.pix20.onnx");
    let r = linearize_with(&out, "20%", &["--granularity", "pixel"]);
    assert_eq!(r["granularity"], "pixel");
    assert_eq!(r["relus_after"].as_u64(), Some(VGG_BUDGET_20));
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 6);
    let units: Vec<u64> = layers.iter().map(|l| l["units"].as_u64().unwrap()).collect();
    // One unit per element of each ReLU's input: 32x28x28, 32x28x28, 64x14x14, ... 256.
    assert_eq!(units, vec![25_088, 25_088, 12_544, 12_544, 6_272, 256]);
    assert!(layers.iter().all(|l| l["relus_per_unit"] == 1));
    let kept: u64 = layers.iter().map(|l| l["kept"].as_array().unwrap().len() as u64).sum();
    assert_eq!(kept, VGG_BUDGET_20);
    let census = relucompile_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(census["total_relus"].as_u64(), Some(VGG_BUDGET_20));
    assert!(relu_layers(&census) <= 6, "{census}");
    passes_the_harness_and_repeats(dir.path(), &out, VGG_BUDGET_20, &["--granularity", "pixel"]);
}

#[test]
fn a_count_budget_is_met_checkpoints_resume_and_bad_budgets_are_usage_errors() {
    let dir = tmpdir();
    let out = dir.path().join("vgg.lin.onnx");
    let ckpt = dir.path().join("ckpt");
    // Channel masks by the penalty (`auto` takes pixel masks at 5000 ReLUs, 6.1%).
    let ckpt_flag = ["--checkpoint-dir", ckpt.to_str().unwrap(), "--granularity", "channel"];
    // One epoch of distillation (the default is 4), then resumed below for a second.
    let r = linearize_with(&out, "5000", &[&ckpt_flag[..], &["--epochs", "1"]].concat());
    assert_eq!(
        (r["granularity"].as_str(), r["mask_method"].as_str()),
        (Some("channel"), Some("penalty"))
    );
    let after = r["relus_after"].as_u64().unwrap();
    assert!(after <= 5000 && after > 5000 - VGG_LARGEST_CHANNEL, "{after}");
    for file in ["masked.onnx", "masks.json", "mask-state.json", "student.onnx", "state.json"] {
        assert!(ckpt.join(file).exists(), "no {file} in the checkpoint");
    }
    // The saved masks, applied to the original by a pipeline step, give the same ReLU layout.
    let applied = dir.path().join("applied.onnx");
    let masks = ckpt.join("masks.json");
    let passes = format!("const-fold,identity-elim,fold-bn,relu-masks({}),dce", masks.display());
    let o = relucompile(&[
        "models/vgg.onnx",
        "-o",
        applied.to_str().unwrap(),
        "--passes",
        &passes,
        "--no-eval",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let ours = relucompile_json(&["inspect", applied.to_str().unwrap(), "--json"]);
    let theirs = relucompile_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(ours["total_relus"], after, "{ours}");
    assert_eq!(ours["nodes"], theirs["nodes"]);
    // Resumed for a second epoch of distillation: the masks come from the checkpoint, and so
    // does the first epoch's record.
    let resumed = dir.path().join("resumed.onnx");
    let flags = [&ckpt_flag[..], &["--resume", "--epochs", "2"]].concat();
    let b = linearize_with(&resumed, "5000", &flags);
    assert_eq!(b["layers"], r["layers"]);
    assert_eq!(b["mask_epochs"], r["mask_epochs"]);
    assert_eq!(b["relus_after"], r["relus_after"]);
    let epochs = b["finetune"]["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    assert_eq!(epochs[0], r["finetune"]["epochs"][0]);
    // Masks learned for another budget are not silently reused.
    let resume = [&["--train-limit", "256", "--resume"][..], &ckpt_flag[..2]].concat();
    let (_, e) = refused(&resumed, &[&["--relu-budget", "4000"][..], &resume].concat());
    assert!(e.contains("was learned for a budget of 5000 ReLUs"), "{e}");
    // Nor are channel masks taken for pixel masks.
    let pixel = ["--relu-budget", "5000", "--granularity", "pixel"];
    let (_, e) = refused(&resumed, &[&pixel[..], &resume].concat());
    assert!(e.contains("with channel masks by the penalty method, not"), "{e}");
    // Nor penalty masks for pruned ones.
    let prune = ["--relu-budget", "5000", "--mask-method", "prune"];
    let (_, e) = refused(&resumed, &[&prune[..], &resume].concat());
    assert!(
        e.contains("by the penalty method, not") && e.ends_with("by the prune method\n"),
        "{e}"
    );
    let bad = dir.path().join("bad.onnx");
    let (code, e) = refused(&bad, &["--relu-budget", "5000", "--granularity", "pixels"]);
    assert!(code == 2 && e.contains("--granularity"), "{e}");
    for budget in ["lots", "150%", "12.5"] {
        let (code, e) = refused(&bad, &["--relu-budget", budget]);
        assert!(code == 2 && e.contains("--relu-budget"), "{budget}: {e}");
        assert!(!bad.exists());
    }
}

/// `--max-relu-layers 2`: the budget is still met, in two layers at most (the rest linear), so
/// a PI engine pays two layers' rounds; the checkpoint remembers the cap.
#[test]
fn a_layer_cap_keeps_relus_in_that_many_layers() {
    let dir = tmpdir();
    let out = dir.path().join("vgg.lin20.l2.onnx");
    let ckpt = dir.path().join("ckpt");
    let ckpt_flag = ["--checkpoint-dir", ckpt.to_str().unwrap()];
    let r = linearize_with(&out, "20%", &[&ckpt_flag[..], &["--max-relu-layers", "2"]].concat());
    assert_eq!(r["max_relu_layers"], 2);
    let after = r["relus_after"].as_u64().unwrap();
    assert!(after <= VGG_BUDGET_20, "{after} ReLUs over the budget");
    let census = relucompile_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(census["total_relus"].as_u64(), Some(after));
    let with_relus = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !l["kept"].as_array().unwrap().is_empty());
    assert!((1..=2).contains(&with_relus.count()), "{}", r["layers"]);
    assert!((1..=2).contains(&relu_layers(&census)), "{census}");
    // The masks of the capped run are not reused without the cap.
    let o = dir.path().join("o.onnx");
    let flags = [&["--relu-budget", "20%", "--train-limit", "256", "--resume"][..], &ckpt_flag];
    let (_, e) = refused(&o, &flags.concat());
    assert!(e.contains("in at most 2 layers"), "{e}");
    let (code, e) = refused(&o, &["--relu-budget", "20%", "--max-relu-layers", "0"]);
    assert_eq!(code, 2, "{e}");
}

/// The pruning method keeps the budget by construction: pixel masks to the ReLU, channel
/// masks within one channel, and pixel masks capped to two layers still to the ReLU; pixel
/// masks repeat byte for byte (channel masks' repeat is the killed `linearize`'s in
/// scale_out.rs: a second run here cost 12 s of the suite).
#[test]
fn pruned_masks_meet_the_budget_by_construction_and_repeat() {
    // 5% of the VGG's 81,792 ReLUs, floored.
    const BUDGET_5: u64 = 4_089;
    let dir = tmpdir();
    for granularity in ["channel", "pixel"] {
        let flags = ["--mask-method", "prune", "--granularity", granularity];
        let out = dir.path().join(format!("vgg.prune5.{granularity}.onnx"));
        let r = linearize_with(&out, "5%", &flags);
        assert_eq!(
            (r["mask_method"].as_str(), r["relu_budget"].as_u64()),
            (Some("prune"), Some(BUDGET_5))
        );
        let after = r["relus_after"].as_u64().unwrap();
        match granularity {
            "pixel" => assert_eq!(after, BUDGET_5),
            _ => assert!(after <= BUDGET_5 && after > BUDGET_5 - VGG_LARGEST_CHANNEL, "{after}"),
        }
        // Hard masks: the kept count after the mask epoch is the graph's.
        assert_eq!(r["soft_relus"].as_f64(), Some(after as f64), "{r}");
        let census = relucompile_json(&["inspect", out.to_str().unwrap(), "--json"]);
        assert_eq!(census["total_relus"].as_u64(), Some(after));
        if granularity == "pixel" {
            let again = dir.path().join("again.onnx");
            linearize_with(&again, "5%", &flags);
            assert!(std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(), "repeat");
        }
    }
    // The defaults (`auto`) at 5%: pixel masks, pruned; capped at 2 layers, the schedule spends
    // the whole budget inside the two, to the ReLU.
    let out = dir.path().join("vgg.auto5.l2.onnx");
    let r = linearize_with(&out, "5%", &["--max-relu-layers", "2"]);
    let chosen = (r["granularity"].as_str(), r["mask_method"].as_str());
    assert_eq!(chosen, (Some("pixel"), Some("prune")));
    assert_eq!(r["relus_after"].as_u64(), Some(BUDGET_5));
    let census = relucompile_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(census["total_relus"].as_u64(), Some(BUDGET_5));
    assert!((1..=2).contains(&relu_layers(&census)), "{census}");
}
