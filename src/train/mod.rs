//! Knowledge-distillation fine-tuning of a reduced graph, on the CPU, from the ONNX graph
//! itself: the reduced network (student) learns from the original (teacher) with
//! `alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(labels)`, as DeepReDuce does
//! to win back the accuracy that culling costs.
//!
//! The student runs in candle (autodiff); the teacher runs forward only on the same augmented
//! batch ([`teacher::Teacher`]). The student is first recalibrated to the teacher's channel
//! statistics and gets a train-mode BatchNorm after every Conv (folded back on output); SGD
//! with Nesterov momentum and a one-cycle schedule by default, AdamW with a cosine schedule on
//! request ([`optim`]). A seed fixes the shuffling and the augmentation, so runs repeat.

pub mod loss;
pub mod masks;
pub mod optim;
pub mod teacher;

use crate::data::Dataset;
use crate::exec::graph::TrainGraph;
use crate::ir::Model;
use crate::passes::recalibrate::Recalibrate;
use crate::passes::{prepare, Pass, PassContext};
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use loss::kl_divergence;
use optim::{learning_rate, Optimizer, OptimizerKind, ScheduleKind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use teacher::Teacher;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneOptions {
    pub epochs: usize,
    pub batch: usize,
    /// Peak learning rate; the schedule decays it to zero along a cosine.
    pub lr: f64,
    pub weight_decay: f64,
    pub temperature: f64,
    /// Weight of the distillation term (1 - alpha goes to cross-entropy on labels).
    pub alpha: f64,
    pub seed: u64,
    /// Random crop after padding this many pixels on each side (0: none).
    pub crop_padding: usize,
    pub hflip: bool,
    pub optimizer: OptimizerKind,
    pub schedule: ScheduleKind,
    /// Train with a BatchNorm after every Conv (folded back into the weights on output).
    pub batchnorm: bool,
    /// Recalibrate the student against the teacher before training (see the `recalibrate`
    /// pass): a culled graph's logits start near 1e3, from which SGD diverges.
    #[serde(default)]
    pub recalibrate: bool,
    /// Scale the peak rate down for runs shorter than [`FULL_RATE_STEPS`] (the default recipe;
    /// an `--lr` the user gives is taken as it is).
    #[serde(default)]
    pub scale_lr_to_run: bool,
}

/// Steps from which a run trains at the full peak rate: one Fashion-MNIST epoch at batch 64.
/// Shorter runs peak at `lr * steps / FULL_RATE_STEPS`. Measured on the culled, refitted
/// ResNet (88.75% on 2,000 test images): 1,024 images x 2 epochs (32 steps) end at 33.35% at
/// the full 0.02 and 89.65% scaled; 8,192 x 1 (128 steps) 89.15% and 90.60%; 16,384 x 1
/// (256 steps) 90.95% and 91.20%.
pub const FULL_RATE_STEPS: usize = 938;

impl FinetuneOptions {
    /// The schedule's peak rate for a run of `total_steps` steps.
    pub fn peak_lr(&self, total_steps: usize) -> f64 {
        if self.scale_lr_to_run {
            self.lr * (total_steps as f64 / FULL_RATE_STEPS as f64).min(1.0)
        } else {
            self.lr
        }
    }

    /// Whether batches are randomly cropped or flipped (otherwise the teacher's logits of each
    /// image are the same every time it is seen).
    pub fn augments(&self) -> bool {
        self.crop_padding > 0 || self.hflip
    }
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        FinetuneOptions {
            epochs: 1,
            batch: 64,
            lr: optim::default_lr(OptimizerKind::Sgd),
            weight_decay: 5e-4,
            temperature: 4.0,
            alpha: 0.9,
            seed: 0,
            // No augmentation: 2 epochs of distillation of the README's main network (ResNet,
            // `cull(1,2),thin(bottom)`) reach 92.47% without, 91.59% with crops of 2 and flips.
            crop_padding: 0,
            hflip: false,
            optimizer: OptimizerKind::Sgd,
            schedule: ScheduleKind::OneCycle,
            batchnorm: true,
            recalibrate: true,
            scale_lr_to_run: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    /// Mean of the batches' total loss, and of its distillation (KL) part.
    pub loss: f64,
    pub kd_loss: f64,
    /// Accuracy on the (augmented) training batches as they were seen.
    pub train_accuracy: f64,
    pub images_per_second: f64,
    pub seconds: f64,
}

/// Training images whose statistics initialise the inserted BatchNorms.
pub(crate) const BATCHNORM_INIT_IMAGES: usize = 512;

/// What a checkpoint directory holds besides `student.onnx` (the folded student, for a user
/// to look at) and the tensors file it names (everything training changes: the weights, the
/// inserted BatchNorms, the optimiser's state), from which a resumed run goes on exactly as
/// the interrupted one would have.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    epochs_done: usize,
    options: FinetuneOptions,
    history: Vec<EpochRecord>,
    /// The safetensors file of this epoch's training state, beside `state.json`. Written before
    /// `state.json`, so a run killed between the two resumes from the epoch before.
    #[serde(default)]
    tensors: Option<String>,
}

/// SplitMix64: a small seeded generator for shuffling and augmentation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random crop (after zero padding) and horizontal flip of one `[C, H, W]` image.
fn augment(
    img: &[f32],
    shape: &[usize],
    opts: &FinetuneOptions,
    rng: &mut Rng,
    out: &mut Vec<f32>,
) {
    let (c, h, w) = (shape[0], shape[1], shape[2]);
    let p = opts.crop_padding;
    let (dy, dx) =
        (rng.below(2 * p + 1) as isize - p as isize, rng.below(2 * p + 1) as isize - p as isize);
    let flip = opts.hflip && rng.next() & 1 == 1;
    // Padding is zero in normalised units: the padded border reads as the mean pixel.
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let sx = if flip { w - 1 - x } else { x } as isize + dx;
                let sy = y as isize + dy;
                let v = if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                    img[ch * h * w + sy as usize * w + sx as usize]
                } else {
                    0.0
                };
                out.push(v);
            }
        }
    }
}

pub struct Finetuner<'a> {
    pub student: &'a Model,
    pub teacher: &'a Model,
    pub train: &'a Dataset,
    pub options: FinetuneOptions,
    /// Where each epoch's checkpoint goes (`student.onnx` and `state.json`), if anywhere.
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from the checkpoint in `checkpoint_dir`.
    pub resume: bool,
    pub progress: bool,
}

pub struct FinetuneResult {
    pub model: Model,
    /// The student training started from: refitted when the recipe recalibrates.
    pub start: Model,
    pub history: Vec<EpochRecord>,
}

impl Finetuner<'_> {
    pub fn run(&self) -> Result<FinetuneResult> {
        let opts = &self.options;
        anyhow::ensure!(opts.batch > 0 && opts.epochs > 0, "epochs and batch must be positive");
        let resumed = match (&self.checkpoint_dir, self.resume) {
            (Some(dir), true) => {
                let found = read_checkpoint(dir, opts)?;
                if found.is_none() {
                    crate::eval::evaluator::progress_line(self.progress, || {
                        format!("no checkpoint in {} yet: starting afresh", dir.display())
                    });
                }
                found
            }
            (None, true) => anyhow::bail!("--resume needs a checkpoint directory"),
            _ => None,
        };
        let sample = &self.train.sample_shape;
        let per = self.train.sample_len();
        // The refitted student is where training starts, and what it must end above. A resumed
        // run builds the same graph from it and then restores the saved state into it.
        let student = if opts.recalibrate {
            let n = self.train.len().min(BATCHNORM_INIT_IMAGES);
            let images = Arc::new(self.train.images[..n * per].to_vec());
            let reference = prepare(self.teacher, &PassContext::new(sample.clone()))?;
            let ctx = PassContext::with_data(sample.clone(), images, &reference);
            let mut refitted = self.student.clone();
            Recalibrate::default().run(&mut refitted, &ctx).context("recalibrating the student")?;
            refitted
        } else {
            self.student.clone()
        };
        let mut graph = TrainGraph::new(&student)?;
        if opts.batchnorm {
            let n = self.train.len().min(BATCHNORM_INIT_IMAGES);
            let mut shape = vec![n];
            shape.extend_from_slice(sample);
            let x = Tensor::from_vec(self.train.images[..n * per].to_vec(), shape, graph.device())?;
            graph.insert_batchnorm(&x)?;
        }
        graph.set_training(true);
        crate::kernels::malloc::retain_freed_memory();
        let mut opt = Optimizer::new(opts.optimizer, graph.vars(), opts.lr, opts.weight_decay)?;
        let (mut history, mut start) = (vec![], 0);
        if let Some((state, tensors)) = resumed {
            let dir = self.checkpoint_dir.as_deref().unwrap_or(Path::new("."));
            let not_this = |e: anyhow::Error| {
                e.context(format!("the checkpoint in {} is not of this student", dir.display()))
            };
            let (of_optimiser, of_graph): (HashMap<_, _>, HashMap<_, _>) = tensors
                .into_iter()
                .partition(|(k, _)| OPTIMISER_PREFIXES.iter().any(|p| k.starts_with(p)));
            graph.restore_training_state(&of_graph).map_err(not_this)?;
            opt.restore_state(&of_optimiser).map_err(not_this)?;
            start = state.epochs_done;
            history = state.history;
        }
        let teacher = Teacher::new(self.teacher, sample)?;
        let logits = Distiller::logits(&teacher, self.teacher, self.train, opts, self.progress)?;
        let distiller = Distiller {
            teacher: &teacher,
            teacher_logits: logits.as_deref().map(Vec::as_slice),
            train: self.train,
            options: opts,
            progress: self.progress,
        };
        for epoch in start..opts.epochs {
            history.push(distiller.epoch(&graph, &mut opt, epoch, &mut NoHook)?);
            if let Some(dir) = &self.checkpoint_dir {
                let state = CheckpointState {
                    epochs_done: epoch + 1,
                    options: opts.clone(),
                    history: history.clone(),
                    tensors: Some(format!("training-epoch-{}.safetensors", epoch + 1)),
                };
                write_checkpoint(dir, &graph, &opt, &student, &state)?;
            }
        }
        Ok(FinetuneResult { model: graph.write_back(&student)?, start: student, history })
    }
}

/// Name prefixes of the optimiser's tensors in a checkpoint ([`Optimizer::state`]).
pub(crate) const OPTIMISER_PREFIXES: [&str; 2] = ["sgd/", "adamw/"];

/// What a distillation loop adds to each step besides the weights' update (mask learning).
pub trait StepHook {
    /// A term added to this step's loss.
    fn extra_loss(&mut self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Called after the weights' update with the step's gradients, at `step` of `total`.
    fn after_step(&mut self, _grads: &GradStore, _step: usize, _total: usize) -> Result<()> {
        Ok(())
    }
    /// Appended to the progress bar's message.
    fn status(&self) -> String {
        String::new()
    }
}

/// Plain distillation.
pub struct NoHook;
impl StepHook for NoHook {}

/// One epoch at a time of distillation from a teacher on augmented training batches.
pub struct Distiller<'a> {
    pub teacher: &'a Teacher,
    /// The teacher's logits on every training image (`[N, classes]`), read instead of running
    /// the teacher when the batches are not augmented ([`Distiller::logits`]).
    pub teacher_logits: Option<&'a [f32]>,
    pub train: &'a Dataset,
    /// The recipe; `epochs` sets the length of the learning-rate schedule.
    pub options: &'a FinetuneOptions,
    pub progress: bool,
}

impl Distiller<'_> {
    /// The teacher's logits on the whole unaugmented training set, when `options` does not
    /// augment (shared by every run on the same teacher and data: [`teacher::dataset_logits`]).
    pub fn logits(
        teacher: &Teacher,
        model: &Model,
        train: &Dataset,
        options: &FinetuneOptions,
        progress: bool,
    ) -> Result<Option<Arc<Vec<f32>>>> {
        if options.augments() {
            return Ok(None);
        }
        teacher::dataset_logits(teacher, model, train, progress).map(Some)
    }

    /// Train `graph` for epoch `epoch` (0-based) of `options.epochs`.
    pub fn epoch(
        &self,
        graph: &TrainGraph,
        opt: &mut Optimizer,
        epoch: usize,
        hook: &mut dyn StepHook,
    ) -> Result<EpochRecord> {
        let opts = self.options;
        let sample = &self.train.sample_shape;
        let per = self.train.sample_len();
        let n = self.train.len();
        let steps_per_epoch = n.div_ceil(opts.batch);
        let total_steps = steps_per_epoch * opts.epochs;
        let peak = opts.peak_lr(total_steps);
        let t2 = opts.temperature * opts.temperature;
        let mut rng = Rng(opts.seed ^ (epoch as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let bar = crate::eval::evaluator::counted_progress_bar(
            n,
            &format!("epoch {}/{}", epoch + 1, opts.epochs),
            "images",
            self.progress,
        );
        let started = Instant::now();
        let (mut loss_sum, mut kd_sum, mut correct, mut seen) = (0.0, 0.0, 0usize, 0usize);
        for (b, idx) in order.chunks(opts.batch).enumerate() {
            let mut x = Vec::with_capacity(idx.len() * per);
            for &i in idx {
                augment(self.train.sample(i), sample, opts, &mut rng, &mut x);
            }
            let labels: Vec<u32> = idx.iter().map(|&i| self.train.labels[i]).collect();
            let mut shape = vec![idx.len()];
            shape.extend_from_slice(sample);
            let xs = Tensor::from_vec(x, shape, graph.device())?;
            let t = match self.teacher_logits {
                Some(all) => {
                    let classes = all.len() / n.max(1);
                    let rows: Vec<f32> = idx
                        .iter()
                        .flat_map(|&i| &all[i * classes..(i + 1) * classes])
                        .copied()
                        .collect();
                    Tensor::from_vec(rows, (idx.len(), classes), graph.device())?
                }
                None => self.teacher.logits(&xs)?,
            };
            let y = Tensor::from_vec(labels.clone(), idx.len(), graph.device())?;
            let s = graph.forward(&xs)?;
            let kd = kl_divergence(&s, &t, opts.temperature)?;
            let ce = candle_nn::loss::cross_entropy(&s, &y)?;
            let mut loss = ((&kd * (opts.alpha * t2))? + (ce * (1.0 - opts.alpha))?)?;
            let distill_loss = loss.to_scalar::<f32>()? as f64;
            anyhow::ensure!(
                distill_loss.is_finite(),
                "training diverged: the loss is {distill_loss} at step {} of epoch {}; try a lower --lr",
                b + 1,
                epoch + 1
            );
            if let Some(extra) = hook.extra_loss()? {
                loss = (loss + extra)?;
            }
            let step = epoch * steps_per_epoch + b;
            opt.set_learning_rate(learning_rate(opts.schedule, peak, step, total_steps));
            let grads = opt.backward_step(&loss)?;
            hook.after_step(&grads, step, total_steps)?;
            let pred: Vec<u32> = s.argmax(1)?.to_vec1()?;
            correct += pred.iter().zip(&labels).filter(|(p, l)| p == l).count();
            seen += idx.len();
            loss_sum += distill_loss * idx.len() as f64;
            kd_sum += kd.to_scalar::<f32>()? as f64 * idx.len() as f64;
            bar.inc(idx.len() as u64);
            bar.set_message(format!(
                "loss {:.4}  acc {:.2}%  {:.0} img/s{}",
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64,
                seen as f64 / started.elapsed().as_secs_f64(),
                hook.status()
            ));
        }
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        crate::eval::evaluator::progress_line(self.progress, || {
            format!(
                "epoch {}/{} done: loss {:.4}, train accuracy {:.2}%, {:.0} img/s, {:.1} s",
                epoch + 1,
                opts.epochs,
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64,
                seen as f64 / seconds,
                seconds
            )
        });
        Ok(EpochRecord {
            epoch: epoch + 1,
            loss: loss_sum / seen as f64,
            kd_loss: kd_sum / seen as f64,
            train_accuracy: correct as f64 / seen as f64,
            images_per_second: seen as f64 / seconds,
            seconds,
        })
    }
}

/// One epoch's checkpoint: the tensors file, the folded student, then `state.json` naming the
/// tensors (each written whole or not at all); older epochs' tensors are removed after.
fn write_checkpoint(
    dir: &Path,
    graph: &TrainGraph,
    opt: &Optimizer,
    student: &Model,
    state: &CheckpointState,
) -> Result<()> {
    let name = state.tensors.as_deref().context("a checkpoint names its tensors")?;
    let mut tensors = graph.training_state()?;
    tensors.extend(opt.state()?);
    write_state_tensors(dir, name, &tensors)?;
    crate::frontend::write_model_atomic(&dir.join("student.onnx"), &graph.write_back(student)?)?;
    crate::frontend::write_bytes_atomic(
        &dir.join("state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    remove_older_states(dir, "training-epoch-", name);
    Ok(())
}

/// Write a training state's tensors to `dir/name` as safetensors, whole or not at all.
pub(crate) fn write_state_tensors(
    dir: &Path,
    name: &str,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
        .context("serialising the training state")?;
    crate::frontend::write_bytes_atomic(&dir.join(name), &bytes)
}

/// Remove the tensors of earlier epochs (`{prefix}*.safetensors` other than `current`), once
/// the state naming `current` is written.
pub(crate) fn remove_older_states(dir: &Path, prefix: &str, current: &str) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with(prefix) && file.ends_with(".safetensors") && file != current {
            std::fs::remove_file(entry.path()).ok();
        }
    }
}

/// The text of a checkpoint's state file, `None` when none was written yet.
pub(crate) fn read_if_written(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The tensors [`write_state_tensors`] wrote.
pub(crate) fn read_state_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .with_context(|| format!("{} is not a training state", path.display()))
}

/// The checkpoint in `dir` (`None` when none was written yet), refused when it was written
/// for another recipe.
fn read_checkpoint(
    dir: &Path,
    opts: &FinetuneOptions,
) -> Result<Option<(CheckpointState, HashMap<String, Tensor>)>> {
    let state_path = dir.join("state.json");
    let Some(text) = read_if_written(&state_path)? else { return Ok(None) };
    let state: CheckpointState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a checkpoint", state_path.display()))?;
    // Another epoch count continues the training on another schedule (a longer run, on
    // purpose); any other change of recipe would resume a different training.
    let recipe =
        |o: &FinetuneOptions| serde_json::to_value(FinetuneOptions { epochs: 0, ..o.clone() });
    anyhow::ensure!(
        recipe(&state.options)? == recipe(opts)?,
        "the checkpoint in {} was written by another recipe (rate, batch, seed, optimiser or \
         augmentation); resume with the same flags, or remove it to start afresh",
        dir.display()
    );
    let name = state.tensors.as_deref().with_context(|| {
        format!(
            "the checkpoint in {} holds no training state (an older relucompile wrote it); \
             remove it to start afresh",
            dir.display()
        )
    })?;
    let tensors = read_state_tensors(&dir.join(name))?;
    Ok(Some((state, tensors)))
}

/// Logits of `model` under the fine-tuner's own forward pass: the written graph must give the
/// same under tract.
pub fn candle_logits(model: &Model, images: &[f32], sample: &[usize]) -> Result<Vec<f32>> {
    let graph = TrainGraph::new(model)?;
    let per: usize = sample.iter().product();
    let mut shape = vec![images.len() / per];
    shape.extend_from_slice(sample);
    let x = Tensor::from_vec(images.to_vec(), shape, graph.device())?;
    Ok(graph.forward(&x)?.flatten_all()?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `img` shifted by (dy, dx), mirrored first when `flip`, zero where it leaves the image.
    fn shifted(img: &[f32], h: usize, w: usize, flip: bool, dy: isize, dx: isize) -> Vec<f32> {
        let mut out = vec![0.0; h * w];
        for y in 0..h {
            for x in 0..w {
                let mirrored = if flip { w - 1 - x } else { x };
                let (sy, sx) = (y as isize + dy, mirrored as isize + dx);
                if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                    out[y * w + x] = img[sy as usize * w + sx as usize];
                }
            }
        }
        out
    }

    #[test]
    fn augmentation_is_off_by_default_and_crops_and_flips_on_request() {
        let (h, w) = (3, 4);
        let img: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        let mut rng = Rng(7);
        let mut out = vec![];
        for _ in 0..8 {
            out.clear();
            augment(&img, &[1, h, w], &FinetuneOptions::default(), &mut rng, &mut out);
            assert_eq!(out, img);
        }
        let on = FinetuneOptions { crop_padding: 1, hflip: true, ..Default::default() };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            out.clear();
            augment(&img, &[1, h, w], &on, &mut rng, &mut out);
            let found = [false, true]
                .into_iter()
                .flat_map(|f| (-1..=1).flat_map(move |dy| (-1..=1).map(move |dx| (f, dy, dx))))
                .find(|&(f, dy, dx)| shifted(&img, h, w, f, dy, dx) == out);
            seen.insert(found.expect("every output is a shifted, maybe mirrored, input"));
        }
        assert_eq!(seen.len(), 18, "every shift, with and without the mirror: {seen:?}");
    }
}
