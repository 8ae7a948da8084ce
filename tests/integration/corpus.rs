//! The exporter corpus: torchvision architectures exported by both PyTorch exporters at
//! several opsets, plus graphs in other styles (scripts/make_corpus.py exports them into
//! fixtures/corpus without their weights; scripts/hydrate_corpus.py fills in seeded weights into
//! target/corpus, once). Every graph must load, get a census, come through the lossless pipeline with
//! the same outputs under tract (relucompile's own check) and onnxruntime (the harness), and pass
//! onnx.checker; the unsupported one must be refused with exit 4 and a message naming it.
//! The table of results goes to target/corpus/table.md.

use crate::common::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

fn corpus_dir() -> PathBuf {
    path("target/corpus")
}

/// Hydrate the corpus (cached: graphs already there are kept). None when python3 lacks the
/// harness's packages outside CI.
fn corpus() -> Option<serde_json::Value> {
    if !python_ready(&["numpy", "onnx", "onnxruntime"]) {
        return None;
    }
    let dir = corpus_dir();
    let o = Command::new("python3")
        .arg(path("scripts/hydrate_corpus.py"))
        .arg(path("fixtures/corpus"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "scripts/hydrate_corpus.py failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    Some(serde_json::from_str(&text).unwrap())
}

#[test]
fn every_corpus_graph_compiles_losslessly_or_is_refused_clearly() {
    let Some(manifest) = corpus() else { return };
    let dir = corpus_dir();
    let work = tmpdir();
    let graphs = manifest["graphs"].as_array().unwrap();
    assert!(graphs.len() >= 30, "the corpus shrank: {} graphs", graphs.len());
    let mut cases = vec![];
    let mut rows = vec![];
    let mut per_family: BTreeMap<String, (u64, u64, String)> = BTreeMap::new();
    let mut census_golden = serde_json::Map::new();
    for g in graphs {
        let name = g["name"].as_str().unwrap();
        let file = dir.join(g["file"].as_str().unwrap());
        let file_s = file.to_str().unwrap();
        let out = work.path().join(format!("{name}.onnx"));
        if g["expect"] == "unsupported" {
            let o = relucompile(&[file_s, "-o", out.to_str().unwrap(), "--no-progress"]);
            assert_eq!(o.code, 4, "{name}: expected exit 4 (unsupported):\n{}", o.stderr);
            assert!(
                o.stderr.contains("Loop") && o.stderr.contains(g["file"].as_str().unwrap()),
                "{}",
                o.stderr
            );
            assert!(!out.exists(), "{name}: a refused graph left an output file");
            rows.push(format!(
                "| {name} | {} | {} | – | – | refused (exit 4): {} | – |",
                g["exporter"].as_str().unwrap(),
                g["opset"],
                o.stderr.lines().next().unwrap_or("").trim()
            ));
            continue;
        }
        let census = relucompile_json(&["inspect", file_s, "--json"]);
        let report =
            relucompile_json(&[file_s, "-o", out.to_str().unwrap(), "--json", "--no-progress"]);
        let (before, after) = (&report["before"], &report["after"]);
        assert_eq!(census["total_relus"], before["total_relus"], "{name}");
        assert!(
            after["total_relus"].as_u64() <= before["total_relus"].as_u64(),
            "{name}: lossless pipeline added ReLUs"
        );
        let rel = report["check_random"]["rel_diff"].as_f64().unwrap();
        assert!(rel <= 1e-4, "{name}: outputs differ under tract ({rel})");
        // Every export of one architecture has the same ReLUs and MACs, whatever the exporter.
        let family = g["family"].as_str().unwrap().to_string();
        let key = (
            before["total_relus"].as_u64().unwrap(),
            before["total_macs"].as_u64().unwrap(),
            name.to_string(),
        );
        let first = per_family.entry(family.clone()).or_insert(key.clone());
        assert_eq!(
            (first.0, first.1),
            (key.0, key.1),
            "{name} and {} (same architecture) disagree on ReLUs/MACs",
            first.2
        );
        census_golden.insert(
            family,
            serde_json::json!({"relus": before["total_relus"], "macs": before["total_macs"],
                               "relus_after_lossless": after["total_relus"]}),
        );
        // onnxruntime: the emitted graph against tract, and against the original graph.
        let sample: Vec<u64> =
            census["input_shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        let per: u64 = sample.iter().product();
        let x = work.path().join(format!("{name}_x.npy"));
        let mut shape = vec![4];
        shape.extend(&sample);
        write_npy(&x, &shape, &relucompile::data::random_inputs(4 * per as usize, 5));
        let mut case = tract_case(&out, &x, &work.path().join(format!("{name}_y.npy")));
        case["reference"] = serde_json::json!(file);
        case["relus"] = after["total_relus"].clone();
        cases.push(case);
        rows.push(format!(
            "| {name} | {} | {} | {} → {} | {} → {} | lossless, equal | {:.1e} |",
            g["exporter"].as_str().unwrap(),
            g["opset"],
            before["nodes"],
            after["nodes"],
            before["total_relus"],
            after["total_relus"],
            report["check_random"]["max_abs_diff"].as_f64().unwrap()
        ));
    }
    let harness = cross_check(work.path(), &cases);
    let table = format!(
        "| graph | exporter | opset | nodes | ReLUs | lossless result | max abs diff (tract) |\n\
         |---|---|---:|---:|---:|---|---:|\n{}\n\nonnxruntime + onnx.checker harness:\n{harness}",
        rows.join("\n")
    );
    std::fs::write(dir.join("table.md"), &table).unwrap();
    assert_golden("fixtures/golden/corpus.census.json", &serde_json::Value::Object(census_golden));
}

/// The native engine on every corpus graph tract runs: the same outputs as tract on random
/// inputs, or a refusal naming the operator (or attribute) it does not take. The count of
/// graphs it takes is the README's.
#[test]
fn the_native_engine_runs_the_corpus_as_tract_does_or_names_what_it_does_not_take() {
    use relucompile::exec::engine::Engine;
    use relucompile::exec::tract::Runner;
    let Some(manifest) = corpus() else { return };
    let dir = corpus_dir();
    let (mut taken, mut refused) = (vec![], vec![]);
    for g in manifest["graphs"].as_array().unwrap() {
        if g["expect"] == "unsupported" {
            continue;
        }
        let name = g["name"].as_str().unwrap();
        let model =
            relucompile::frontend::load_model(&dir.join(g["file"].as_str().unwrap())).unwrap();
        let sample = relucompile::analysis::shapes::sample_shape(&model, None).unwrap();
        let per: usize = sample.iter().product();
        match Engine::new(&model, &sample) {
            Ok(engine) => {
                let x = relucompile::data::random_inputs(2 * per, 17);
                let (ours, width) = engine.run(&x).unwrap();
                let runner = Runner::new(&model, &sample, 1).unwrap();
                for i in 0..2 {
                    let (want, w) = runner.run(&x[i * per..(i + 1) * per]).unwrap();
                    assert_eq!(w, width, "{name}");
                    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let d = ours[i * width..(i + 1) * width]
                        .iter()
                        .zip(&want)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(d / scale < 1e-4, "{name}: the engine differs from tract by {d}");
                }
                taken.push(name.to_string());
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(
                    msg.contains("node "),
                    "{name}: the refusal names no node and no operator: {msg}"
                );
                refused.push(format!("{name}: {}", msg.lines().next().unwrap_or("")));
            }
        }
    }
    eprintln!("native engine takes {} corpus graphs; refuses {}:", taken.len(), refused.len());
    for r in &refused {
        eprintln!("  {r}");
    }
    // Every export of ResNet-18/50, MobileNetV2, SqueezeNet, DenseNet, GoogLeNet and
    // EfficientNet (29 of 32; ShuffleNet's channel shuffle needs Transpose).
    assert!(taken.len() >= 29, "the engine took only {taken:?}");
}
