//! Work past one process: a frontier split into shards (separate processes, as a scheduler
//! runs them) and merged, a frontier run on HyperQueue by `scripts/frontier_hyperqueue.py`,
//! and pareto, finetune and linearize killed with SIGKILL at points taken from their progress
//! and rerun: every route writes the same bytes as one uninterrupted run, and no half-written
//! file is left.

use crate::common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A small frontier that trains: two fine-tuned points (2 epochs, so a point's training
/// checkpoints once before it ends) and one learned point, three work items to deal. Without
/// recalibration and on few images, it takes 13 s in the test build.
const FRONTIER_FLAGS: &[&str] = &[
    "--calibration-images",
    "64",
    "--limit",
    "200",
    "--seed",
    "7",
    "--cull-search",
    "prefixes",
    "--no-dimensions",
    "--no-recalibrate",
    "--finetune-epochs",
    "2",
    "--finetune-train-limit",
    "64",
    "--finetune-levels",
    "25%,10%",
    "--learned",
    "20%",
    "--no-progress",
];

fn pareto_args<'a>(dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["pareto", "models/vgg.onnx", "-o", dir.to_str().unwrap()];
    args.extend_from_slice(FRONTIER_FLAGS);
    args.extend_from_slice(extra);
    args
}

/// Where this file's tests write, under cargo's scratch space for this target.
fn scratch_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("scale_out")
}

/// A directory under [`scratch_root`], emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = scratch_root().join(name);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The frontier of [`FRONTIER_FLAGS`] in one uninterrupted process, searched once for every
/// test of this test process; and how long it took. Each test process has its own directory
/// (nextest runs every test in a process of its own, and two searches writing one directory
/// broke each other); those of processes no longer running are removed.
fn uninterrupted() -> &'static (PathBuf, Duration) {
    static RUN: OnceLock<(PathBuf, Duration)> = OnceLock::new();
    RUN.get_or_init(|| {
        for entry in std::fs::read_dir(scratch_root()).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("uninterrupted-").and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                std::fs::remove_dir_all(entry.path()).ok();
            }
        }
        let dir = scratch(&format!("uninterrupted-{}", std::process::id()));
        let started = Instant::now();
        let o = relucompile(&pareto_args(&dir, &[]));
        assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
        (dir, started.elapsed())
    })
}

/// The files a frontier is made of, by name: what a sharded, merged or resumed search must
/// write byte for byte as the uninterrupted one.
fn frontier_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("frontier.") || (name.starts_with("point-") && name.ends_with(".onnx"))
        {
            files.insert(name, std::fs::read(entry.path()).unwrap());
        }
    }
    files
}

fn assert_same_frontier(dir: &Path, how: &str) {
    let (reference, _) = uninterrupted();
    let (want, got) = (frontier_files(reference), frontier_files(dir));
    let names = |f: &BTreeMap<String, Vec<u8>>| f.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want), "{how}: other files");
    assert!(want.len() >= 7, "a frontier of points and its five reports: {:?}", names(&want));
    for (name, bytes) in &want {
        assert!(&got[name] == bytes, "{how}: {name} differs from the uninterrupted run's");
    }
    assert_no_partial_files(dir);
}

/// No temporary file of an atomic write is left anywhere under `dir`.
fn assert_no_partial_files(dir: &Path) {
    for entry in walk(dir) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.ends_with(".partial"), "a half-written file is left: {}", entry.display());
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Run the shards as separate processes (at most two at once, this machine's cores), then
/// the merge.
fn sharded(count: usize) -> PathBuf {
    let dir = scratch(&format!("sharded-{count}"));
    let binary = env!("CARGO_BIN_EXE_relucompile");
    let shards: Vec<String> = (0..count).map(|i| format!("{i}/{count}")).collect();
    for pair in shards.chunks(2) {
        let children: Vec<_> = pair
            .iter()
            .map(|shard| {
                Command::new(binary)
                    .args(pareto_args(&dir, &["--shard", shard]))
                    .current_dir(root())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (child, shard) in children.into_iter().zip(pair) {
            let o = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "shard {shard}: {err}");
        }
    }
    dir
}

/// A frontier as 2 and as 3 shards in separate processes, merged: the same files, byte for
/// byte, as the search in one process. A merge before every shard is done trains nothing and
/// names what is missing (exit 9), and a merge with other flags is refused.
#[test]
fn sharded_frontiers_merge_to_the_uninterrupted_one() {
    if !prerequisite(Path::new(FASHION_MNIST).exists(), "Fashion-MNIST") {
        return;
    }
    uninterrupted();
    let two = sharded(2);
    // The learned point (item 2, shard 0/2's) set aside: the merge names it and its shard,
    // and writes no frontier.
    let shard1: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(two.join("shards/1-of-2/done.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(shard1["points_to_train"], 3, "{shard1}");
    assert_eq!(shard1["trained"].as_array().unwrap().len(), 1, "{shard1}");
    let aside = two.with_extension("aside");
    std::fs::remove_dir_all(&aside).ok();
    std::fs::rename(two.join("learned"), &aside).unwrap();
    let o = relucompile(&pareto_args(&two, &["--merge"]));
    assert_eq!(o.code, 9, "{}", o.stderr);
    assert!(
        o.stderr.contains("learned-masks(16358)") && o.stderr.contains("shard 0/2"),
        "{}",
        o.stderr
    );
    assert!(!two.join("frontier.json").exists(), "a failed merge wrote a frontier");
    std::fs::rename(&aside, two.join("learned")).unwrap();
    let o = relucompile(&pareto_args(&two, &["--merge", "--finetune-levels", "50%"]));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("other search flags"), "{}", o.stderr);
    let o = relucompile(&pareto_args(&two, &["--merge"]));
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_same_frontier(&two, "2 shards");

    let three = sharded(3);
    let o = relucompile(&pareto_args(&three, &["--merge"]));
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_same_frontier(&three, "3 shards");
}

/// The engine script: HyperQueue's LocalCluster with two workers runs the shards as tasks,
/// then the merge; the frontier is the uninterrupted one.
#[test]
fn the_hyperqueue_script_runs_a_sharded_frontier() {
    if !prerequisite(Path::new(FASHION_MNIST).exists(), "Fashion-MNIST")
        || !python_ready(&["hyperqueue"])
    {
        return;
    }
    uninterrupted();
    let dir = scratch("hyperqueue");
    let mut args = vec![
        path("scripts/frontier_hyperqueue.py").to_string_lossy().into_owned(),
        "models/vgg.onnx".into(),
        "-o".into(),
        dir.to_string_lossy().into_owned(),
        "--shards".into(),
        "2".into(),
        "--workers".into(),
        "2".into(),
        "--relucompile".into(),
        env!("CARGO_BIN_EXE_relucompile").into(),
        "--json".into(),
        "--".into(),
    ];
    args.extend(FRONTIER_FLAGS.iter().map(|s| s.to_string()));
    let o = Command::new("python3").args(&args).current_dir(root()).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["shards"].as_array().unwrap().len(), 2, "{report}");
    assert_same_frontier(&dir, "HyperQueue");
}

/// What a killed run's rerun is compared against.
const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";

/// Start `args`, and SIGKILL it once `ready(stderr so far)` holds; panics if it finished
/// first (the kill point was never reached) or failed.
/// Returns what the run had printed to stderr when it was killed.
fn kill_when(args: &[&str], ready: impl Fn(&str) -> bool) -> String {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_relucompile"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let stderr = std::fs::read_to_string(log.path()).unwrap_or_default();
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{args:?} ended ({status}) before its kill point:\n{stderr}");
        }
        if ready(&stderr) {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return stderr;
        }
        assert!(Instant::now() < deadline, "{args:?} never reached its kill point");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After the kills: no output yet; the same command run to its end writes `whole`'s bytes to
/// `out`, and nothing half-written is left in `dir`.
fn finish_as_the_whole_run(args: &[&str], out: &str, whole: &str, dir: &Path) {
    assert!(!Path::new(out).exists(), "a killed run wrote its output");
    let o = relucompile(args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let same = std::fs::read(out).unwrap() == std::fs::read(whole).unwrap();
    assert!(same, "{args:?}: the resumed run wrote other bytes than the run never stopped");
    assert_no_partial_files(dir);
}

fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

/// Whether any checkpoint under `dir` has finished an epoch.
fn checkpointed(dir: &Path) -> bool {
    dir.exists() && walk(dir).iter().any(|p| p.ends_with("state.json"))
}

/// pareto killed during scoring (a few candidates journaled) and again during a point's
/// training (after its first epoch's checkpoint), rerun each time with the same command:
/// the frontier of the uninterrupted run; rerun once more when finished, it scores nothing.
#[test]
fn a_killed_frontier_search_resumes_to_the_same_bytes() {
    if !prerequisite(Path::new(FASHION_MNIST).exists(), "Fashion-MNIST") {
        return;
    }
    uninterrupted();
    let dir = scratch("killed");
    let args = pareto_args(&dir, &[]);
    kill_when(&args, |_| lines_in(&dir.join("candidates.jsonl")) >= 3);
    assert!(!dir.join("frontier.json").exists());
    kill_when(&args, |_| checkpointed(&dir.join("finetuned")));
    assert!(!dir.join("frontier.json").exists());
    let o = relucompile(&args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_same_frontier(&dir, "killed twice");
    // Rerun on the finished directory: nothing is scored again, the same frontier.
    let journal = std::fs::read(dir.join("candidates.jsonl")).unwrap();
    let o = relucompile(&args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(std::fs::read(dir.join("candidates.jsonl")).unwrap() == journal, "rescored");
    assert_same_frontier(&dir, "rerun when finished");
}

fn finetune_args<'a>(student: &'a str, out: &'a str, ckpt: &'a str) -> Vec<&'a str> {
    vec!["finetune", student, "--teacher", "models/vgg.onnx", "-o", out]
        .into_iter()
        .chain(training_tail(ckpt))
        .collect()
}

/// The recipe both kill tests train with (3 epochs, so a kill lands between checkpoints;
/// `--keep-trained`: the bytes of the trained network whatever the guard says), checkpointed
/// into `ckpt` and resumed from it.
fn training_tail(ckpt: &str) -> [&str; 12] {
    [
        "--epochs",
        "3",
        "--train-limit",
        "128",
        "--batch",
        "32",
        "--limit",
        "100",
        "--keep-trained",
        "--checkpoint-dir",
        ckpt,
        "--resume",
    ]
}

/// finetune killed as its first epoch reports and again mid-run after a checkpoint, rerun with
/// the same command (`--resume` with nothing to resume starts afresh): the same bytes as a run
/// never stopped, and nothing half-written.
#[test]
fn a_killed_finetune_resumes_to_the_same_bytes() {
    if !prerequisite(Path::new(FASHION_MNIST).exists(), "Fashion-MNIST") {
        return;
    }
    let dir = tmpdir();
    let student = dir.path().join("student.onnx");
    let o = relucompile(&[
        "models/vgg.onnx",
        "-o",
        student.to_str().unwrap(),
        "--cull",
        "1",
        "--no-eval",
        "--no-progress",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let s = student.to_str().unwrap();
    let path_of = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    // The run never stopped writes no checkpoint: checkpoints change nothing either.
    let whole = path_of("whole.onnx");
    let plain = finetune_args(s, &whole, "");
    let o = relucompile(&plain[..plain.len() - 3]); // without --checkpoint-dir and --resume
    assert_eq!(o.code, 0, "{}", o.stderr);
    let (resumed, ckpt) = (path_of("resumed.onnx"), path_of("ckpt"));
    let args = finetune_args(s, &resumed, &ckpt);
    // First kill: as soon as the first epoch reports; second: once two epochs are saved.
    kill_when(&args, |err| err.contains("epoch 1/3 done"));
    kill_when(&args, |_| {
        std::fs::read_to_string(Path::new(&ckpt).join("state.json"))
            .is_ok_and(|t| t.contains("\"epochs_done\": 2"))
    });
    finish_as_the_whole_run(&args, &resumed, &whole, dir.path());
    // A checkpoint is resumed only by its own recipe.
    let other = [&args[..], &["--lr", "0.001"]].concat();
    let o = relucompile(&other);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("another recipe"), "{}", o.stderr);
}

/// linearize killed after its first of two mask epochs (its state saved) and again during the
/// distillation after a checkpoint, rerun with the same command: the second run goes on from
/// the saved mask epoch, and the end is the same masks and the same bytes as a run never
/// stopped.
#[test]
fn a_killed_linearize_resumes_to_the_same_bytes() {
    if !prerequisite(Path::new(FASHION_MNIST).exists(), "Fashion-MNIST") {
        return;
    }
    let dir = tmpdir();
    let path_of = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let args = |out: &str, ckpt: &str| -> Vec<String> {
        ["linearize", "models/vgg.onnx", "-o", out, "--relu-budget", "20%", "--lr", "0.005"]
            .into_iter()
            .chain(["--mask-epochs", "2"])
            .chain(training_tail(ckpt))
            .map(String::from)
            .collect()
    };
    let (whole, resumed) = (path_of("whole.onnx"), path_of("resumed.onnx"));
    let (whole_ckpt, ckpt) = (path_of("whole-ckpt"), path_of("ckpt"));
    let full = args(&whole, &whole_ckpt);
    let o = relucompile(&full.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.code, 0, "{}", o.stderr);
    let again = args(&resumed, &ckpt);
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    let ckpt = Path::new(&ckpt);
    kill_when(&again, |_| ckpt.join("mask-state.json").exists());
    let second = kill_when(&again, |_| ckpt.join("state.json").exists());
    assert!(
        second.contains("resuming the mask phase after epoch 1 of 2"),
        "the second run did not resume the mask phase:\n{second}"
    );
    // The masks themselves (the file's epoch records hold timings).
    let masks = |d: &str| {
        let text = std::fs::read_to_string(Path::new(d).join("masks.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["layers"].clone()
    };
    assert_eq!(
        masks(&path_of("ckpt")),
        masks(&whole_ckpt),
        "the resumed phase learned other masks"
    );
    finish_as_the_whole_run(&again, &resumed, &whole, dir.path());
}
