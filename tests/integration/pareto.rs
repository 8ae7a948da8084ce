//! `relucompile pareto` and `criticality` on the shipped ResNet: a real frontier, repeatable,
//! and every file matching what frontier.json says about it.

use crate::common::*;

/// The shipped ResNet's frontier, drawn beside the PyTorch DeepReDuce reference points.
fn pareto(dir: &std::path::Path) -> serde_json::Value {
    pareto_of("models/resnet18w16.onnx", dir, &["--reference", "docs/deepreduce_reference.json"])
}

fn pareto_of(model: &str, dir: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "pareto",
        model,
        "-o",
        dir.to_str().unwrap(),
        "--calibration-images",
        "128",
        "--test-limit",
        "500",
        "--seed",
        "7",
        // The full search (every cull subset, half width and resolution) is for users; the
        // test keeps to DeepReDuce's criticality-ordered prefixes.
        "--cull-search",
        "prefixes",
        "--no-dimensions",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = relucompile(&args);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("frontier.json")).unwrap()).unwrap();
    let printed: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(printed, written, "--json prints what frontier.json holds");
    written
}

/// The indices of a frontier's cheapest point, a middle one and its last (most ReLUs): the
/// points a test runs again when running every one would cost a process each.
fn three_of(points: usize) -> [usize; 3] {
    [0, points / 2, points - 1]
}

#[test]
fn frontier_is_non_dominated_repeatable_and_matches_its_files() {
    let a = tmpdir();
    let fa = pareto(a.path());
    let points = fa["points"].as_array().unwrap();
    assert!(points.len() >= 3, "{fa}");
    // Every point's census is checked; three points' accuracies are measured again (the
    // cheapest, a middle one, the one with most ReLUs), each an evaluation in its own process.
    let reevaluated = three_of(points.len());
    for (i, p) in points.iter().enumerate() {
        for q in points {
            let (pr, pa) = (p["relus"].as_u64().unwrap(), p["accuracy"].as_f64().unwrap());
            let (qr, qa) = (q["relus"].as_u64().unwrap(), q["accuracy"].as_f64().unwrap());
            let dominated = qr <= pr && qa >= pa && (qr < pr || qa > pa);
            assert!(!dominated, "{p} is dominated by {q}");
        }
        assert!((0.0..=1.0).contains(&p["accuracy"].as_f64().unwrap()));
        let file = a.path().join(p["file"].as_str().unwrap());
        let census = relucompile_json(&["inspect", file.to_str().unwrap(), "--json"]);
        assert_eq!(census["total_relus"], p["relus"], "{p}");
        if !reevaluated.contains(&i) {
            continue;
        }
        let eval = relucompile_json(&[
            "eval",
            file.to_str().unwrap(),
            "--limit",
            "500",
            "--json",
            "--no-progress",
        ]);
        let (ea, pa) = (eval["accuracy"].as_f64().unwrap(), p["accuracy"].as_f64().unwrap());
        assert!((ea - pa).abs() <= 0.001, "{p}: re-evaluated {ea}");
    }
    for ext in ["csv", "md", "svg", "png"] {
        assert!(
            a.path().join(format!("frontier.{ext}")).metadata().unwrap().len() > 100,
            "frontier.{ext}"
        );
    }
    // The reference's three configurations are in the JSON, the table and the plot.
    let reference = fa["reference"]["points"].as_array().unwrap();
    assert_eq!(reference.len(), 3, "{}", fa["reference"]);
    assert_eq!(reference[1]["relus"], 10_368);
    let md = std::fs::read_to_string(a.path().join("frontier.md")).unwrap();
    assert!(md.contains("| `cull(0,1,2),thin(bottom)` | 10,368 | 89.74% |"), "{md}");
    let svg = std::fs::read_to_string(a.path().join("frontier.svg")).unwrap();
    assert!(svg.contains("DeepReDuce in PyTorch") && svg.contains("cull(0,1,2,3),thin(bottom)"));
    let bad = a.path().join("bad.json");
    std::fs::write(&bad, "{\"points\": 3}").unwrap();
    let o = relucompile(&[
        "pareto",
        "models/vgg.onnx",
        "-o",
        a.path().to_str().unwrap(),
        "--reference",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--reference") && o.stderr.contains("bad.json"), "{}", o.stderr);
    // --relu-budget with --frontier takes the most accurate point under the budget, and
    // rebuilds exactly that network.
    let mid = &points[points.len() / 2];
    let budget = mid["relus"].as_u64().unwrap();
    let out = a.path().join("chosen.onnx");
    let r = relucompile_json(&[
        "models/resnet18w16.onnx",
        "-o",
        out.to_str().unwrap(),
        "--relu-budget",
        &budget.to_string(),
        "--frontier",
        a.path().to_str().unwrap(),
        "--limit",
        "500",
        "--json",
        "--no-progress",
    ]);
    let best = points
        .iter()
        .filter(|p| p["relus"].as_u64().unwrap() <= budget)
        .max_by(|x, y| x["accuracy"].as_f64().unwrap().total_cmp(&y["accuracy"].as_f64().unwrap()))
        .unwrap();
    assert_eq!(r["after"]["total_relus"], best["relus"], "{r}");
    let (ra, ba) = (r["accuracy"]["after"].as_f64().unwrap(), best["accuracy"].as_f64().unwrap());
    assert!((ra - ba).abs() <= 0.001, "rebuilt point: {ra} vs frontier {ba}");
    // The same configuration and seed rebuild the point's file byte for byte (a second whole
    // search took three minutes of the suite; the resume below replays the same journal).
    let point = std::fs::read(a.path().join(best["file"].as_str().unwrap())).unwrap();
    assert!(std::fs::read(&out).unwrap() == point, "rebuilt {} differs", best["file"]);
    std::fs::remove_file(&out).unwrap();
    // Resuming (from a finished directory, and from one killed part-way) is scale_out's.
}

#[test]
fn resuming_with_another_seed_is_refused() {
    let dir = tmpdir();
    std::fs::write(
        dir.path().join("search.json"),
        r#"{"model_fnv64":"0","seed":1,"calibration_images":1,"data":"x"}"#,
    )
    .unwrap();
    let o = relucompile(&[
        "pareto",
        "models/resnet18w16.onnx",
        "-o",
        dir.path().to_str().unwrap(),
        "--no-progress",
    ]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("another model, seed or data"), "{}", o.stderr);
}

#[test]
fn criticality_orders_every_stage() {
    // 128 images (64 fit, 64 score) order the stages as well as any count for this test, in
    // half the time of 256 (16 against 29 s beside a training run).
    let v =
        relucompile_json(&["criticality", "models/resnet18w16.onnx", "--images", "128", "--json"]);
    let mut order: Vec<u64> =
        v["cull_order"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    assert_eq!(v["stages"].as_array().unwrap().len(), 5);
    order.sort();
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
    assert!(v["accuracy_original"].as_f64().unwrap() > 0.85);
}

/// `--objective latency` on the shipped VGG: the frontier is non-dominated in estimated
/// seconds and accuracy, each point carries the cost model's estimate of its own file,
/// max-pool replacement reaches the frontier (pooling is most of this network's PI cost), and
/// the points match the golden: configurations, ReLUs and estimated costs exactly, accuracy
/// within 0.3 points (500 test images).
/// Every point's replay is shown in frontier.md with the recalibration explicit in its
/// --passes, and rebuilds its file byte for byte (three of them run here).
fn assert_points_replay(dir: &std::path::Path, points: &[serde_json::Value]) {
    let md = std::fs::read_to_string(dir.join("frontier.md")).unwrap();
    // Every point's replay is in the table; the cheapest, a middle and the original one are
    // rebuilt (each is a whole compile with its refit and evaluation).
    let rebuilt = three_of(points.len());
    for (i, p) in points.iter().enumerate() {
        let file = p["file"].as_str().unwrap();
        let replay: Vec<&str> =
            p["replay"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
        if p["config"] != "original" {
            assert!(p["passes"].as_str().unwrap().contains("recalibrate"), "{p}");
        }
        assert!(md.contains(&format!("-o {file}\n")), "{file} has no replay in:\n{md}");
        if !rebuilt.contains(&i) {
            continue;
        }
        let rebuilt = dir.join("replayed.onnx");
        let mut args = replay.clone();
        args.extend_from_slice(&["-o", rebuilt.to_str().unwrap(), "--no-progress"]);
        let o = relucompile(&args);
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
        let original = std::fs::read(dir.join(file)).unwrap();
        assert!(std::fs::read(&rebuilt).unwrap() == original, "replaying {file} differs: {args:?}");
        std::fs::remove_file(&rebuilt).unwrap();
    }
}

#[test]
fn latency_frontier_of_the_vgg_matches_its_golden() {
    let dir = tmpdir();
    let f = pareto_of("models/vgg.onnx", dir.path(), &["--objective", "latency"]);
    assert_eq!(f["objective"], "latency");
    let points = f["points"].as_array().unwrap();
    let num = |p: &serde_json::Value, k: &str| p[k].as_f64().unwrap();
    for p in points {
        for q in points {
            let better = num(q, "seconds") <= num(p, "seconds")
                && num(q, "accuracy") >= num(p, "accuracy")
                && (num(q, "seconds") < num(p, "seconds")
                    || num(q, "accuracy") > num(p, "accuracy"));
            assert!(!better, "{p} is dominated by {q}");
        }
        let file = dir.path().join(p["file"].as_str().unwrap());
        let census = relucompile_json(&["inspect", file.to_str().unwrap(), "--json"]);
        assert_eq!(census["total_relus"], p["relus"], "{p}");
        assert_eq!(census["cost"]["seconds"], p["seconds"], "{p}");
        assert_eq!(census["cost"]["bytes"], p["bytes"], "{p}");
    }
    assert!(
        points.iter().any(|p| p["config"].as_str().unwrap().contains("maxpool-to-avgpool")),
        "{f}"
    );
    assert_points_replay(dir.path(), points);
    let cheapest = points.iter().map(|p| num(p, "seconds")).fold(f64::INFINITY, f64::min);
    assert!(cheapest < 0.5 * num(&f["original"], "seconds"), "{f}");
    let summary: Vec<serde_json::Value> = points
        .iter()
        .map(|p| {
            serde_json::json!({"config": p["config"], "relus": p["relus"], "bytes": p["bytes"],
                "seconds": p["seconds"], "accuracy": p["accuracy"]})
        })
        .collect();
    let name = "fixtures/golden/vgg.frontier.latency.json";
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        assert_golden(name, &serde_json::Value::Array(summary));
        return;
    }
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path(name)).unwrap()).unwrap();
    let golden = golden.as_array().unwrap();
    assert_eq!(golden.len(), summary.len(), "{name}: {summary:?}");
    for (g, a) in golden.iter().zip(&summary) {
        for key in ["config", "relus", "bytes", "seconds"] {
            assert_eq!(g[key], a[key], "{name}: {key} of {a}");
        }
        let (ga, aa) = (num(g, "accuracy"), num(a, "accuracy"));
        assert!((ga - aa).abs() <= 0.003, "{name}: accuracy {aa} vs golden {ga} for {a}");
    }
}

/// Recovery inside the search, in one run (each search costs a minute here):
/// - `--probe-images`: the candidates of the first two Pareto layers are distilled briefly and
///   ranked by what they reach, and every point says so;
/// - `--finetune-epochs`: every point is distilled;
/// - `--learned 30% --learned-granularity pixel`: a learned-mask point joins them, with
///   exactly its budget of ReLUs (a pixel mask is one ReLU);
/// - a rerun takes the probes, the fine-tuned points and the learned one from the directory
///   instead of training them again, and gives the same frontier.
#[test]
fn probes_fine_tuning_and_learned_masks_in_one_search_that_resumes() {
    let dir = tmpdir();
    let flags = [
        "--probe-images",
        "128",
        "--learned",
        "30%",
        "--learned-granularity",
        "pixel",
        "--finetune-epochs",
        "1",
        "--finetune-train-limit",
        "128",
    ];
    let f = pareto_of("models/vgg.onnx", dir.path(), &flags);
    assert_eq!(f["probe_images"], 128);
    let probed = f["probed"].as_u64().unwrap() as usize;
    let points = f["points"].as_array().unwrap();
    let learned = f["learned"].as_array().unwrap();
    assert_eq!(learned.len(), 1, "{f}");
    let l = &learned[0];
    let deepreduce = points.len() - usize::from(!l["file"].as_str().unwrap().is_empty());
    assert!(deepreduce > 0 && probed >= deepreduce, "{f}");
    for p in points.iter().filter(|p| p != &l) {
        let a = p["probe_accuracy"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&a), "{p}");
    }
    for p in points {
        assert!(p["accuracy_before_finetune"].is_number(), "every point was fine-tuned: {p}");
    }
    let journal = || std::fs::read_to_string(dir.path().join("probes.jsonl")).unwrap();
    let first = journal();
    assert_eq!(first.lines().count(), probed, "{first}");
    let budget = 81_792 * 30 / 100;
    assert_eq!(l["config"], format!("learned-masks({budget},pixel)"));
    let relus = l["relus"].as_u64().unwrap();
    assert_eq!(relus, budget);
    assert!((0.0..=1.0).contains(&l["accuracy"].as_f64().unwrap()), "{l}");
    if !l["file"].as_str().unwrap().is_empty() {
        let file = dir.path().join(l["file"].as_str().unwrap());
        let census = relucompile_json(&["inspect", file.to_str().unwrap(), "--json"]);
        assert_eq!(census["total_relus"], relus);
    }
    let started = std::time::Instant::now();
    let again = pareto_of("models/vgg.onnx", dir.path(), &flags);
    assert_eq!(journal(), first, "the probes were run again");
    assert_eq!(again, f);
    assert!(started.elapsed().as_secs() < 120, "the rerun trained again");
}

/// `--probe-images` outside `pareto`: a budget compile ranks its best candidates again after a
/// short distillation and picks the best of those, and criticality scores its variants after
/// one; both say so in their JSON.
#[test]
fn recovery_probes_rank_budget_candidates_and_criticality_variants() {
    let dir = tmpdir();
    let out = dir.path().join("o.onnx");
    let r = relucompile_json(&[
        "models/vgg.onnx",
        "-o",
        out.to_str().unwrap(),
        "--relu-budget",
        "50%",
        "--calibration-images",
        "64",
        "--probe-images",
        "128",
        "--limit",
        "200",
        "--json",
        "--no-progress",
    ]);
    let b = &r["budget"];
    let probed: Vec<&serde_json::Value> = b["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("probe_accuracy").is_some())
        .collect();
    assert!(!probed.is_empty() && probed.len() <= 4, "{b}");
    // The probed ones are the most accurate after the refit among those under the budget.
    let limit = b["limit"].as_f64().unwrap();
    let least_probed =
        probed.iter().map(|c| c["calibration_accuracy"].as_f64().unwrap()).fold(1.0, f64::min);
    for c in b["candidates"].as_array().unwrap() {
        // Dominated candidates (another under the budget keeps all their ReLUs) go unscored.
        let scored = c["relus"].as_f64().unwrap() <= limit && c["dominated_by"].is_null();
        if scored && c.get("probe_accuracy").is_none() {
            assert!(c["calibration_accuracy"].as_f64().unwrap() <= least_probed, "{c}");
        }
    }
    let best = probed.iter().map(|c| c["probe_accuracy"].as_f64().unwrap()).fold(0.0, f64::max);
    assert_eq!(b["chosen"]["probe_accuracy"].as_f64().unwrap(), best, "{b}");
    assert!(out.exists());
    // Only with a budget.
    let o = relucompile(&["models/vgg.onnx", "-o", out.to_str().unwrap(), "--probe-images", "8"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let c = relucompile_json(&[
        "criticality",
        "models/vgg.onnx",
        "--images",
        "64",
        "--probe-images",
        "128",
        "--json",
    ]);
    assert_eq!(c["probe_images"], 128);
    let mut order: Vec<u64> =
        c["cull_order"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    order.sort();
    assert_eq!(order, vec![0, 1, 2, 3], "{c}");
}
