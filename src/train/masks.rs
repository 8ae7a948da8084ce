//! Learned ReLU masks (`relucompile linearize`), after SNL (Cho et al., ICML 2022): every
//! masked ReLU computes `a * relu(x) + (1 - a) * x` with a trainable `a` per channel or per
//! pixel (a mask *unit*, see [`Granularity`]), initialised to 1; the distillation loss gains
//! `lambda * sum(a * w)` with `w` a unit's share of the ReLUs, so that a unit is cheap to keep
//! in proportion to what it costs a PI engine. `lambda` follows a controller that walks the
//! soft ReLU count `sum(a * relus_per_unit)` down to the budget over the mask epochs; then the
//! masks are made binary (the units with the largest `a` that fit the budget keep their ReLU)
//! and the graph is rewritten so that only those units compute one, gathered into one dense
//! tensor per layer.

use super::optim::{Optimizer, OptimizerKind};
use super::teacher::Teacher;
use super::{Distiller, EpochRecord, FinetuneOptions, StepHook, BATCHNORM_INIT_IMAGES};
use crate::data::Dataset;
use crate::exec::graph::TrainGraph;
pub use crate::exec::relu_mask::{Granularity, MaskSite};
use crate::frontend::write_bytes_atomic;
use crate::ir::Model;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Adam's step on the masks. Chosen by reasoning, not a sweep: Adam moves an unopposed mask by
/// about its learning rate a step, so 0.01 takes one from 1 to 0 in about 100 steps (6,400
/// images at batch 64), a tenth of a Fashion-MNIST epoch. Measured with it on the shipped
/// ResNet at 10%: one mask epoch ended at a soft count of 11,786 for a budget of 10,854.
pub const DEFAULT_MASK_LR: f64 = 0.01;
/// The controller multiplies or divides `lambda` by this after every step (not tuned: 1.02 a
/// step spans six orders of magnitude in 700 steps, under an epoch).
const LAMBDA_STEP: f64 = 1.02;
/// `lambda` at the first step (in units of the distillation loss per average channel; not
/// tuned, the controller moves it within the first few hundred steps).
const LAMBDA_START: f64 = 1e-3;
/// Share of the mask steps over which the target soft count falls from the original's to the
/// budget; the rest holds it there so the masks settle near 0 or 1.
const RAMP: f64 = 0.7;
/// A channel whose mask ends at or below this is linear whatever the budget (SNL's 0.01).
pub const MASK_FLOOR: f32 = 0.01;
/// Pruning: units are dropped every this many steps while the schedule falls (about 80 times
/// in a Fashion-MNIST epoch at batch 64; not tuned).
const PRUNE_EVERY: usize = 8;
/// Pruning: the running mean of a unit's squared mask gradient forgets at this rate a step,
/// so it averages about the last 50 batches (3,200 images at batch 64; not tuned).
const IMPORTANCE_DECAY: f64 = 0.98;

/// How the mask phase decides which units keep their ReLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskMethod {
    /// SNL's: soft masks trained by Adam under a penalty whose weight `lambda` a controller
    /// walks towards the budget; binarised by mask value at the end.
    #[default]
    Penalty,
    /// Progressive pruning: hard masks, all 1 at first; a cubic schedule lowers the count
    /// from the original's to the budget over the first 70% of the mask steps, dropping the
    /// units whose removal the first-order Taylor estimate (the mask's gradient, averaged
    /// over recent batches) says costs least per ReLU. The budget holds by construction.
    Prune,
}

impl MaskMethod {
    pub const ALL: [MaskMethod; 2] = [MaskMethod::Penalty, MaskMethod::Prune];

    pub fn word(self) -> &'static str {
        match self {
            MaskMethod::Penalty => "penalty",
            MaskMethod::Prune => "prune",
        }
    }
}

impl std::fmt::Display for MaskMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

impl std::str::FromStr for MaskMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        MaskMethod::ALL
            .into_iter()
            .find(|m| m.word() == s)
            .ok_or_else(|| format!("mask method '{s}' is not one of: penalty, prune"))
    }
}

/// With `--granularity auto` and `--mask-method auto`, budgets in
/// (`PIXEL_MASKS_ABOVE`, `PIXEL_MASKS_AT_OR_BELOW`] of the model's ReLUs get pixel masks pruned
/// to the budget, all others channel masks under the penalty: the pair each budget measured
/// best on the shipped ResNet (1 mask epoch + 2 epochs, full test set; docs/learned-masks.md).
/// 10%: channel/penalty 92.50% (11 ReLU layers), pixel/prune 91.34% (16). 5%: pixel/prune
/// 91.67% (15), channel/penalty 91.17% (10). 2%: channel/penalty 89.41% (5), pixel/prune
/// 89.34% (14), a tie that the channel masks' fewer layers (PI rounds) decide. The bounds
/// are the midpoints between the measured budgets.
pub const PIXEL_MASKS_ABOVE: f64 = 0.035;
pub const PIXEL_MASKS_AT_OR_BELOW: f64 = 0.075;

/// The granularity and method for a budget of `share` of the model's ReLUs, each as given or,
/// when `None` (`auto`), as measured best: pixel masks want the pruning method (the penalty
/// cannot steer tens of thousands of them: docs/learned-masks.md) and channel masks the
/// penalty (pruning lost at 5%).
pub fn measured_choice(
    share: f64,
    granularity: Option<Granularity>,
    method: Option<MaskMethod>,
) -> (Granularity, MaskMethod) {
    let small = share > PIXEL_MASKS_ABOVE && share <= PIXEL_MASKS_AT_OR_BELOW;
    let granularity = granularity.unwrap_or(match method {
        Some(MaskMethod::Prune) => Granularity::Pixel,
        Some(MaskMethod::Penalty) => Granularity::Channel,
        None if small => Granularity::Pixel,
        None => Granularity::Channel,
    });
    let method = method.unwrap_or(match granularity {
        Granularity::Pixel => MaskMethod::Prune,
        Granularity::Channel => MaskMethod::Penalty,
    });
    (granularity, method)
}

/// What a mask phase's hook reports at the end, and saves in a mask epoch's checkpoint.
trait MaskPhase: StepHook {
    /// The soft ReLU count (the kept count when masks are hard).
    fn soft_relus(&self) -> f64;
    /// The penalty's weight (0 without a penalty).
    fn lambda(&self) -> f64;
    /// The hook's own tensors (names start with [`HOOK_PREFIX`]); its scalars are
    /// `soft_relus` and `lambda`.
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restore what [`MaskPhase::state`] saved, after the graph's masks were restored.
    fn restore(&mut self, tensors: &HashMap<String, Tensor>, soft: f64, lambda: f64) -> Result<()>;
}

/// Name prefix of a mask hook's tensors in a mask epoch's checkpoint.
const HOOK_PREFIX: &str = "hook/";

/// The mask phase's extra loss term, mask updates and `lambda` controller.
struct MaskHook {
    vars: Vec<Var>,
    /// Per site, each unit's penalty weight: its ReLUs over the average unit's.
    weights: Vec<Tensor>,
    relus_per_unit: Vec<usize>,
    total: f64,
    budget: f64,
    lambda: f64,
    soft: f64,
    /// Adam on the masks, the fine-tuner's own (its moments can be checkpointed).
    adam: Optimizer,
}

impl MaskHook {
    fn new(graph: &TrainGraph, sites: &[MaskSite], budget: u64, lr: f64) -> Result<Self> {
        let total = relus_of(sites);
        let units: usize = sites.iter().map(|s| s.units()).sum();
        let average = total as f64 / units.max(1) as f64;
        let vars: Vec<Var> = sites.iter().map(|s| graph.masks()[&s.relu].clone()).collect();
        let weights = sites
            .iter()
            .map(|s| {
                let w = (s.relus_per_unit() as f64 / average) as f32;
                Ok(Tensor::full(w, s.mask_dims(), graph.device())?)
            })
            .collect::<Result<_>>()?;
        let adam = Optimizer::new(OptimizerKind::Adamw, vars.clone(), lr, 0.0)?;
        Ok(MaskHook {
            vars,
            weights,
            relus_per_unit: sites.iter().map(|s| s.relus_per_unit()).collect(),
            total: total as f64,
            budget: budget as f64,
            lambda: LAMBDA_START,
            soft: total as f64,
            adam,
        })
    }
}

impl StepHook for MaskHook {
    fn extra_loss(&mut self) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for (a, w) in self.vars.iter().zip(&self.weights) {
            let term = (a.as_tensor() * w)?.sum_all()?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(match sum {
            Some(s) => Some((s * self.lambda)?),
            None => None,
        })
    }

    fn after_step(&mut self, grads: &GradStore, step: usize, total: usize) -> Result<()> {
        self.adam.step(grads)?;
        let mut soft = 0.0;
        for (a, &n) in self.vars.iter().zip(&self.relus_per_unit) {
            let clamped = a.as_tensor().clamp(0f32, 1f32)?;
            soft += clamped.sum_all()?.to_scalar::<f32>()? as f64 * n as f64;
            a.set(&clamped)?;
        }
        self.soft = soft;
        let progress = (step + 1) as f64 / (RAMP * total as f64);
        let target = self.total - (self.total - self.budget) * progress.min(1.0);
        self.lambda =
            if soft > target { self.lambda * LAMBDA_STEP } else { self.lambda / LAMBDA_STEP };
        Ok(())
    }

    fn status(&self) -> String {
        format!("  soft ReLUs {:.0}  lambda {:.1e}", self.soft, self.lambda)
    }
}

impl MaskPhase for MaskHook {
    fn soft_relus(&self) -> f64 {
        self.soft
    }
    fn lambda(&self) -> f64 {
        self.lambda
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let state = self.adam.state()?;
        Ok(state.into_iter().map(|(k, t)| (format!("{HOOK_PREFIX}{k}"), t)).collect())
    }
    fn restore(&mut self, tensors: &HashMap<String, Tensor>, soft: f64, lambda: f64) -> Result<()> {
        let of_adam: HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(HOOK_PREFIX)?.to_string(), t.clone())))
            .collect();
        self.adam.restore_state(&of_adam)?;
        (self.soft, self.lambda) = (soft, lambda);
        Ok(())
    }
}

/// The ReLUs of every masked site, all kept.
fn relus_of(sites: &[MaskSite]) -> usize {
    sites.iter().map(|s| s.units() * s.relus_per_unit()).sum()
}

/// The pruning method's state: hard masks and every unit's running importance.
struct PruneHook {
    vars: Vec<Var>,
    relus_per_unit: Vec<usize>,
    /// Per site and unit: the running mean of the squared mask gradient.
    importance: Vec<Vec<f64>>,
    kept: Vec<Vec<bool>>,
    kept_relus: u64,
    total: u64,
    budget: u64,
    /// At most this many layers keep ReLUs: halfway through the schedule, every other layer
    /// goes linear ([`PruneHook::cap_layers`]).
    max_layers: Option<usize>,
    capped: bool,
}

impl PruneHook {
    /// `vars`: each site's mask, all 1.
    fn new(vars: Vec<Var>, sites: &[MaskSite], budget: u64, max_layers: Option<usize>) -> Self {
        let total = relus_of(sites);
        PruneHook {
            vars,
            relus_per_unit: sites.iter().map(|s| s.relus_per_unit()).collect(),
            importance: sites.iter().map(|s| vec![0.0; s.units()]).collect(),
            kept: sites.iter().map(|s| vec![true; s.units()]).collect(),
            kept_relus: total as u64,
            total: total as u64,
            budget: budget.min(total as u64),
            max_layers,
            capped: false,
        }
    }

    /// Keep ReLUs in the `max_layers` layers that keep the most now (ties in graph order), so
    /// the rest of the schedule spends the budget inside them; every other layer goes linear.
    fn cap_layers(&mut self) -> Result<()> {
        self.capped = true;
        let Some(k) = self.max_layers else { return Ok(()) };
        let relus = |s: usize| self.kept[s].iter().filter(|&&k| k).count() * self.relus_per_unit[s];
        let mut by_kept: Vec<usize> = (0..self.kept.len()).collect();
        by_kept.sort_by(|&a, &b| relus(b).cmp(&relus(a)).then(a.cmp(&b)));
        let mut changed = vec![false; self.kept.len()];
        for &s in by_kept.iter().skip(k) {
            for kept in self.kept[s].iter_mut().filter(|k| **k) {
                *kept = false;
                self.kept_relus -= self.relus_per_unit[s] as u64;
                changed[s] = true;
            }
        }
        self.write_masks(&changed)
    }

    /// Set the masks of the `changed` sites to their kept units (1) and the rest (0).
    fn write_masks(&self, changed: &[bool]) -> Result<()> {
        for (s, var) in self.vars.iter().enumerate().filter(|&(s, _)| changed[s]) {
            let values: Vec<f32> =
                self.kept[s].iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
            let t = Tensor::from_vec(values, var.as_tensor().shape(), var.as_tensor().device())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The count the schedule allows after `done` of `ramp` steps: cubic, so the early
    /// steps, where the network has the most redundancy, drop the most (Zhu and Gupta 2017).
    fn target(&self, done: usize, ramp: usize) -> u64 {
        let left = 1.0 - (done as f64 / ramp.max(1) as f64).min(1.0);
        self.budget + ((self.total - self.budget) as f64 * left.powi(3)).floor() as u64
    }

    /// Drop the kept units worth least per ReLU until at most `target` ReLUs are kept.
    fn prune_to(&mut self, target: u64) -> Result<()> {
        if self.kept_relus <= target {
            return Ok(());
        }
        let mut candidates: Vec<(f64, usize, usize)> = vec![];
        for (s, kept) in self.kept.iter().enumerate() {
            let per = self.relus_per_unit[s] as f64;
            for (u, _) in kept.iter().enumerate().filter(|(_, &k)| k) {
                candidates.push((self.importance[s][u].sqrt() / per, s, u));
            }
        }
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let mut changed = vec![false; self.kept.len()];
        for (_, s, u) in candidates {
            if self.kept_relus <= target {
                break;
            }
            self.kept[s][u] = false;
            self.kept_relus -= self.relus_per_unit[s] as u64;
            changed[s] = true;
        }
        self.write_masks(&changed)
    }
}

impl StepHook for PruneHook {
    fn after_step(&mut self, grads: &GradStore, step: usize, total: usize) -> Result<()> {
        for (var, importance) in self.vars.iter().zip(&mut self.importance) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            for (i, g) in importance.iter_mut().zip(g.flatten_all()?.to_vec1::<f32>()?) {
                *i = IMPORTANCE_DECAY * *i + (1.0 - IMPORTANCE_DECAY) * (g as f64 * g as f64);
            }
        }
        let ramp = ((RAMP * total as f64) as usize).max(1);
        let done = step + 1;
        if !self.capped && 2 * done >= ramp {
            self.cap_layers()?;
        }
        if done.is_multiple_of(PRUNE_EVERY) || done >= ramp {
            self.prune_to(self.target(done, ramp))?;
        }
        Ok(())
    }

    fn status(&self) -> String {
        format!("  kept ReLUs {}", self.kept_relus)
    }
}

impl MaskPhase for PruneHook {
    fn soft_relus(&self) -> f64 {
        self.kept_relus as f64
    }
    fn lambda(&self) -> f64 {
        0.0
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = candle_core::Device::Cpu;
        let mut out = vec![(
            format!("{HOOK_PREFIX}capped"),
            Tensor::from_slice(&[u8::from(self.capped)], 1, &dev)?,
        )];
        for (s, imp) in self.importance.iter().enumerate() {
            let t = Tensor::from_slice(imp, imp.len(), &dev)?;
            out.push((format!("{HOOK_PREFIX}importance/{s}"), t));
        }
        Ok(out)
    }
    /// The kept units are read back from the restored masks (1 kept, 0 linear).
    fn restore(&mut self, tensors: &HashMap<String, Tensor>, _: f64, _: f64) -> Result<()> {
        let saved = |name: String| {
            tensors.get(&name).cloned().with_context(|| format!("the saved state lacks {name}"))
        };
        self.capped = saved(format!("{HOOK_PREFIX}capped"))?.to_vec1::<u8>()? == [1];
        let mut kept_relus = 0;
        for (s, var) in self.vars.iter().enumerate() {
            let imp: Vec<f64> = saved(format!("{HOOK_PREFIX}importance/{s}"))?.to_vec1()?;
            anyhow::ensure!(
                imp.len() == self.importance[s].len(),
                "site {s}'s importances are of another site"
            );
            self.importance[s] = imp;
            let masks: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            self.kept[s] = masks.iter().map(|&a| a > 0.5).collect();
            kept_relus += self.kept[s].iter().filter(|&&k| k).count() * self.relus_per_unit[s];
        }
        self.kept_relus = kept_relus as u64;
        Ok(())
    }
}

/// What the mask phase decided for one Relu.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMask {
    pub relu: String,
    /// Mask units: channels, or positions of one image's activation (flat, channel-major).
    #[serde(alias = "channels")]
    pub units: usize,
    #[serde(alias = "relus_per_channel")]
    pub relus_per_unit: usize,
    /// Units that keep their ReLU, in order.
    pub kept: Vec<usize>,
    /// The mean of the learned masks before they were made binary.
    pub mean_mask: f64,
}

impl LayerMask {
    pub fn relus(&self) -> usize {
        self.kept.len() * self.relus_per_unit
    }
}

/// Binary masks within `budget` ReLUs: units by decreasing mask value (ties in graph and
/// unit order), each kept if it still fits and its mask is above [`MASK_FLOOR`]. With
/// `max_layers`, only that many layers may keep ReLUs: those with the largest soft ReLU count
/// (mask values times ReLUs per unit), since a PI engine pays about the same rounds for a
/// ReLU layer whatever its size (CrypTen: ~9 per layer).
pub fn choose_kept(
    sites: &[MaskSite],
    values: &[Vec<f32>],
    budget: u64,
    max_layers: Option<usize>,
) -> Vec<LayerMask> {
    let soft = |s: usize| -> f64 {
        values[s].iter().map(|&a| a as f64).sum::<f64>() * sites[s].relus_per_unit() as f64
    };
    let mut by_mass: Vec<usize> = (0..sites.len()).collect();
    by_mass.sort_by(|&a, &b| soft(b).total_cmp(&soft(a)).then(a.cmp(&b)));
    let allowed: Vec<bool> = {
        let mut allowed = vec![max_layers.is_none(); sites.len()];
        for &s in by_mass.iter().take(max_layers.unwrap_or(0)) {
            allowed[s] = true;
        }
        allowed
    };
    let mut order: Vec<(usize, usize)> = sites
        .iter()
        .enumerate()
        .filter(|&(s, _)| allowed[s])
        .flat_map(|(s, site)| (0..site.units()).map(move |c| (s, c)))
        .filter(|&(s, c)| values[s][c] > MASK_FLOOR)
        .collect();
    order.sort_by(|&(s1, c1), &(s2, c2)| values[s2][c2].total_cmp(&values[s1][c1]));
    let mut kept: Vec<Vec<usize>> = vec![vec![]; sites.len()];
    let mut used = 0u64;
    for (s, c) in order {
        let cost = sites[s].relus_per_unit() as u64;
        if used + cost <= budget {
            used += cost;
            kept[s].push(c);
        }
    }
    sites
        .iter()
        .zip(kept)
        .zip(values)
        .map(|((site, mut kept), v)| {
            kept.sort_unstable();
            LayerMask {
                relu: site.relu.clone(),
                units: site.units(),
                relus_per_unit: site.relus_per_unit(),
                kept,
                mean_mask: v.iter().map(|&a| a as f64).sum::<f64>() / v.len().max(1) as f64,
            }
        })
        .collect()
}

/// The mask phase: train the weights and the masks of `model` together under distillation
/// from `teacher`, then make the masks binary within `budget` ReLUs.
pub struct MaskLearning<'a> {
    pub model: &'a Model,
    pub teacher: &'a Model,
    pub train: &'a Dataset,
    /// The recipe of the mask epochs (`epochs` is their number).
    pub options: FinetuneOptions,
    pub budget: u64,
    /// At most this many layers keep ReLUs (see [`choose_kept`]).
    pub max_layers: Option<usize>,
    pub granularity: Granularity,
    pub method: MaskMethod,
    /// Adam's rate for the penalty method's soft masks.
    pub mask_lr: f64,
    pub progress: bool,
    /// Where each mask epoch's state goes (`mask-state.json` and the tensors it names).
    pub checkpoint_dir: Option<&'a Path>,
    /// Go on from the last mask epoch saved in `checkpoint_dir`, if one was.
    pub resume: bool,
}

/// What a mask phase learns for; a checkpoint is resumed only for the same.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct MaskKey {
    pub relu_budget: u64,
    #[serde(default)]
    pub max_relu_layers: Option<usize>,
    /// Checkpoints written before pixel masks existed hold channel masks.
    #[serde(default)]
    pub granularity: Granularity,
    /// Checkpoints written before the pruning method existed hold the penalty's masks.
    #[serde(default)]
    pub method: MaskMethod,
}

impl std::fmt::Display for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a budget of {} ReLUs", self.relu_budget)?;
        if let Some(k) = self.max_relu_layers {
            write!(f, " in at most {k} layers")?;
        }
        write!(f, " with {} masks by the {} method", self.granularity, self.method)
    }
}

/// A finished mask epoch in a checkpoint directory (`mask-state.json`), with the tensors file
/// it names: the weights, BatchNorms and masks, both optimisers' state and the hook's.
#[derive(Serialize, Deserialize)]
struct MaskEpochState {
    #[serde(flatten)]
    key: MaskKey,
    options: FinetuneOptions,
    mask_lr: f64,
    epochs_done: usize,
    history: Vec<EpochRecord>,
    soft_relus: f64,
    lambda: f64,
    tensors: String,
}

const MASK_STATE: &str = "mask-state.json";
const MASK_TENSORS_PREFIX: &str = "mask-epoch-";

pub struct MaskResult {
    /// `model` with the trained weights (BatchNorm folded) and the binary masks applied.
    pub model: Model,
    pub history: Vec<EpochRecord>,
    pub layers: Vec<LayerMask>,
    /// The soft ReLU count and `lambda` after the last step.
    pub soft_relus: f64,
    pub lambda: f64,
}

impl MaskLearning<'_> {
    pub fn run(&self) -> Result<MaskResult> {
        let opts = &self.options;
        anyhow::ensure!(
            opts.batch > 0 && opts.epochs > 0,
            "mask epochs and batch must be positive"
        );
        let sample = &self.train.sample_shape;
        let per = self.train.sample_len();
        let mut graph = TrainGraph::new(self.model)?;
        let n = self.train.len().min(BATCHNORM_INIT_IMAGES);
        let mut shape = vec![n];
        shape.extend_from_slice(sample);
        let x = Tensor::from_vec(self.train.images[..n * per].to_vec(), shape, graph.device())?;
        if opts.batchnorm {
            graph.insert_batchnorm(&x)?;
        }
        let sites = graph.insert_relu_masks(&x.narrow(0, 0, 1)?, self.granularity)?;
        anyhow::ensure!(!sites.is_empty(), "the graph has no ReLU on a channel axis to mask");
        graph.set_training(true);
        crate::kernels::malloc::retain_freed_memory();
        let teacher = Teacher::new(self.teacher, sample)?;
        let logits = Distiller::logits(&teacher, self.teacher, self.train, opts, self.progress)?;
        let mut opt = Optimizer::new(opts.optimizer, graph.vars(), opts.lr, opts.weight_decay)?;
        let mut hook: Box<dyn MaskPhase> = match self.method {
            MaskMethod::Penalty => {
                Box::new(MaskHook::new(&graph, &sites, self.budget, self.mask_lr)?)
            }
            MaskMethod::Prune => {
                let vars = sites.iter().map(|s| graph.masks()[&s.relu].clone()).collect();
                Box::new(PruneHook::new(vars, &sites, self.budget, self.max_layers))
            }
        };
        let distiller = Distiller {
            teacher: &teacher,
            teacher_logits: logits.as_deref().map(Vec::as_slice),
            train: self.train,
            options: opts,
            progress: self.progress,
        };
        let (mut history, mut start) = (vec![], 0);
        if let Some(dir) = self.checkpoint_dir.filter(|_| self.resume) {
            if let Some((state, tensors)) = self.read_epoch_state(dir)? {
                let not_this = |e: anyhow::Error| {
                    e.context(format!(
                        "the mask checkpoint in {} is not of this model",
                        dir.display()
                    ))
                };
                let mut parts: [HashMap<String, Tensor>; 3] = Default::default();
                for (name, t) in tensors {
                    let part = if name.starts_with(HOOK_PREFIX) {
                        2
                    } else if super::OPTIMISER_PREFIXES.iter().any(|p| name.starts_with(p)) {
                        1
                    } else {
                        0
                    };
                    parts[part].insert(name, t);
                }
                graph.restore_training_state(&parts[0]).map_err(not_this)?;
                opt.restore_state(&parts[1]).map_err(not_this)?;
                hook.restore(&parts[2], state.soft_relus, state.lambda).map_err(not_this)?;
                crate::eval::evaluator::progress_line(self.progress, || {
                    format!(
                        "resuming the mask phase after epoch {} of {} ({})",
                        state.epochs_done,
                        opts.epochs,
                        dir.display()
                    )
                });
                (history, start) = (state.history, state.epochs_done);
            }
        }
        for epoch in start..opts.epochs {
            history.push(distiller.epoch(&graph, &mut opt, epoch, hook.as_mut())?);
            if let Some(dir) = self.checkpoint_dir {
                let name = format!("{MASK_TENSORS_PREFIX}{}.safetensors", epoch + 1);
                let mut tensors = graph.training_state()?;
                tensors.extend(opt.state()?);
                tensors.extend(hook.state()?);
                super::write_state_tensors(dir, &name, &tensors)?;
                let state = MaskEpochState {
                    key: self.key(),
                    options: opts.clone(),
                    mask_lr: self.mask_lr,
                    epochs_done: epoch + 1,
                    history: history.clone(),
                    soft_relus: hook.soft_relus(),
                    lambda: hook.lambda(),
                    tensors: name.clone(),
                };
                let text = serde_json::to_string_pretty(&state)?;
                write_bytes_atomic(&dir.join(MASK_STATE), text.as_bytes())?;
                super::remove_older_states(dir, MASK_TENSORS_PREFIX, &name);
            }
        }
        let values: Vec<Vec<f32>> = sites
            .iter()
            .map(|s| Ok(graph.masks()[&s.relu].as_tensor().flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<_>>()?;
        let layers = choose_kept(&sites, &values, self.budget, self.max_layers);
        let mut model = graph.write_back(self.model)?;
        for (site, layer) in sites.iter().zip(&layers) {
            let keep = match site.granularity {
                Granularity::Channel => crate::passes::channel_thin::keep_relu_channels,
                Granularity::Pixel => crate::passes::channel_thin::keep_relu_positions,
            };
            keep(&mut model, &site.relu, &site.input, &site.dims, &layer.kept);
        }
        Ok(MaskResult {
            model,
            history,
            layers,
            soft_relus: hook.soft_relus(),
            lambda: hook.lambda(),
        })
    }
}

impl MaskLearning<'_> {
    pub fn key(&self) -> MaskKey {
        MaskKey {
            relu_budget: self.budget,
            max_relu_layers: self.max_layers,
            granularity: self.granularity,
            method: self.method,
        }
    }

    /// The last finished mask epoch saved in `dir` (`None` when none was), refused when it
    /// was learned for another budget, method or recipe.
    fn read_epoch_state(
        &self,
        dir: &Path,
    ) -> Result<Option<(MaskEpochState, HashMap<String, Tensor>)>> {
        let path = dir.join(MASK_STATE);
        let Some(text) = super::read_if_written(&path)? else { return Ok(None) };
        let state: MaskEpochState = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a mask checkpoint", path.display()))?;
        let key = self.key();
        anyhow::ensure!(
            state.key == key,
            "the mask checkpoint in {} was learned for {}, not {key}",
            dir.display(),
            state.key,
        );
        let recipe = |o: &FinetuneOptions| serde_json::to_value(o);
        anyhow::ensure!(
            recipe(&state.options)? == recipe(&self.options)? && state.mask_lr == self.mask_lr,
            "the mask checkpoint in {} was written by another recipe (mask epochs, rate, batch, \
             seed, optimiser or augmentation); resume with the same flags, or remove it to \
             start afresh",
            dir.display()
        );
        let tensors = super::read_state_tensors(&dir.join(&state.tensors))?;
        Ok(Some((state, tensors)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_masks_fill_the_budget_by_mask_value() {
        let site = |name: &str, c, n| {
            MaskSite::new(name, &format!("{name}_in"), &[c, n], Granularity::Channel)
        };
        let sites = [site("a", 3, 100), site("b", 2, 10)];
        let values = vec![vec![0.9, 0.005, 0.5], vec![0.95, 0.6]];
        // By value: b0 (10), a0 (100), b1 (10), a2 (100: does not fit 150), a1 (below floor).
        let layers = choose_kept(&sites, &values, 150, None);
        assert_eq!(layers[0].kept, vec![0]);
        assert_eq!(layers[1].kept, vec![0, 1]);
        assert_eq!(layers.iter().map(LayerMask::relus).sum::<usize>(), 120);
        let all = choose_kept(&sites, &values, 1000, None);
        assert_eq!(all[0].kept, vec![0, 2], "a mask at the floor stays linear");
        // One layer allowed: a's soft count (140.5) beats b's (15.5), so b goes linear even
        // though its masks are the largest.
        let one = choose_kept(&sites, &values, 150, Some(1));
        assert_eq!((one[0].kept.clone(), one[1].kept.clone()), (vec![0], vec![]));
        let two = choose_kept(&sites, &values, 150, Some(2));
        assert_eq!(two[0].kept, layers[0].kept);
        assert_eq!(two[1].kept, layers[1].kept);
    }

    /// Channel mask sites `(name, channels, ReLUs per channel)` and their masks, all 1.
    fn channel_sites(spec: &[(&str, usize, usize)]) -> (Vec<MaskSite>, Vec<Var>) {
        let sites: Vec<MaskSite> = spec
            .iter()
            .map(|&(name, c, n)| {
                MaskSite::new(name, &format!("{name}_in"), &[c, n], Granularity::Channel)
            })
            .collect();
        let vars = sites
            .iter()
            .map(|s| Var::ones(s.units(), candle_core::DType::F32, &candle_core::Device::Cpu))
            .collect::<candle_core::Result<_>>()
            .unwrap();
        (sites, vars)
    }

    /// The pruning schedule starts at the full count and ends at the budget; pruning drops the
    /// units worth least per ReLU (importance per ReLU, ties in site and unit order), sets
    /// their masks to 0 and stops as soon as the count is within the target.
    #[test]
    fn pruning_drops_the_cheapest_units_per_relu_down_to_the_schedule() {
        let (sites, vars) = channel_sites(&[("a", 3, 100), ("b", 2, 10)]);
        let mut hook = PruneHook::new(vars.clone(), &sites, 150, None);
        assert_eq!((hook.target(0, 10), hook.target(10, 10), hook.target(20, 10)), (320, 150, 150));
        // Halfway: 150 + 170 / 8, floored.
        assert_eq!(hook.target(5, 10), 171);
        // Square roots of the importances over the ReLUs: a 0.04, 0.01, 0.09; b 0.03, 0.1.
        hook.importance = vec![vec![16.0, 1.0, 81.0], vec![0.09, 1.0]];
        hook.prune_to(300).unwrap();
        assert_eq!(hook.kept, vec![vec![true, false, true], vec![true, true]]);
        assert_eq!(hook.kept_relus, 220);
        // Next b0 (10 ReLUs, 210 > 150), then a0 (100): 110.
        hook.prune_to(150).unwrap();
        assert_eq!(hook.kept, vec![vec![false, false, true], vec![false, true]]);
        assert_eq!(hook.kept_relus, 110);
        let a: Vec<f32> = vars[0].as_tensor().to_vec1().unwrap();
        let b: Vec<f32> = vars[1].as_tensor().to_vec1().unwrap();
        assert_eq!((a, b), (vec![0.0, 0.0, 1.0], vec![0.0, 1.0]));
        let layers = choose_kept(&sites, &[vec![0.0, 0.0, 1.0], vec![0.0, 1.0]], 150, None);
        assert_eq!(layers.iter().map(LayerMask::relus).sum::<usize>(), 110);
    }

    /// A mask epoch's checkpoint restores the pruning state: the importances from the saved
    /// tensors, the kept units and their count from the masks.
    #[test]
    fn a_restored_pruning_hook_goes_on_from_the_same_state() {
        let (sites, vars) = channel_sites(&[("a", 3, 100), ("b", 2, 10)]);
        let mut hook = PruneHook::new(vars.clone(), &sites, 150, None);
        hook.importance = vec![vec![16.0, 1.0, 81.0], vec![0.09, 1.0]];
        hook.prune_to(150).unwrap();
        hook.capped = true;
        let saved: HashMap<String, Tensor> = hook.state().unwrap().into_iter().collect();
        assert_eq!(saved.len(), 3);
        let mut again = PruneHook::new(vars.clone(), &sites, 150, None);
        again.restore(&saved, 0.0, 0.0).unwrap();
        assert_eq!(again.importance, hook.importance);
        assert_eq!(again.kept, hook.kept);
        assert_eq!(again.kept_relus, 110);
        assert!(again.capped);
        let mut other = PruneHook::new(vars[..1].to_vec(), &sites[..1], 150, None);
        other.importance[0].push(0.0);
        assert!(other.restore(&saved, 0.0, 0.0).is_err(), "another site's importances");
    }

    /// With a layer cap, halfway through the schedule only the layers keeping the most ReLUs
    /// keep any; the rest of the schedule prunes inside them, to the budget.
    #[test]
    fn a_layer_cap_linearises_the_smaller_layers_halfway_through_the_schedule() {
        let (sites, vars) = channel_sites(&[("a", 3, 100), ("b", 2, 10), ("c", 4, 50)]);
        let mut hook = PruneHook::new(vars.clone(), &sites, 150, Some(2));
        hook.importance = vec![vec![16.0, 1.0, 81.0], vec![100.0, 100.0], vec![1.0; 4]];
        // Gradients of something else: the importances stay as set.
        let other = Var::ones(1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let grads = other.as_tensor().sum_all().unwrap().backward().unwrap();
        // 10 steps, ramp 7: the cap comes at step 4 (2 * 4 >= 7).
        for step in 0..3 {
            hook.after_step(&grads, step, 10).unwrap();
        }
        assert!(!hook.capped);
        hook.after_step(&grads, 3, 10).unwrap();
        assert!(hook.capped);
        // a (300) and c (200) keep more than b (20), whose units were worth the most per ReLU.
        assert_eq!(hook.kept[1], vec![false, false]);
        for step in 4..10 {
            hook.after_step(&grads, step, 10).unwrap();
        }
        // Then by importance per ReLU inside a and c: a1, c0..c3, a0 (100 ReLUs: 200 > 150).
        assert_eq!(hook.kept, vec![vec![false, false, true], vec![false; 2], vec![false; 4]]);
        assert_eq!(hook.kept_relus, 100);
        let b: Vec<f32> = vars[1].as_tensor().to_vec1().unwrap();
        assert_eq!(b, vec![0.0, 0.0]);
    }

    #[test]
    fn auto_takes_pixel_pruning_near_5_percent_and_completes_a_half_given_choice() {
        use Granularity::{Channel, Pixel};
        use MaskMethod::{Penalty, Prune};
        assert_eq!(measured_choice(0.05, None, None), (Pixel, Prune));
        assert_eq!(measured_choice(PIXEL_MASKS_AT_OR_BELOW, None, None), (Pixel, Prune));
        assert_eq!(measured_choice(PIXEL_MASKS_ABOVE, None, None), (Channel, Penalty));
        assert_eq!(measured_choice(0.02, None, None), (Channel, Penalty));
        assert_eq!(measured_choice(0.25, None, None), (Channel, Penalty));
        assert_eq!(measured_choice(0.02, Some(Channel), None), (Channel, Penalty));
        assert_eq!(measured_choice(0.25, Some(Pixel), None), (Pixel, Prune));
        assert_eq!(measured_choice(0.02, None, Some(Penalty)), (Channel, Penalty));
        assert_eq!(measured_choice(0.25, None, Some(Prune)), (Pixel, Prune));
        assert_eq!(measured_choice(0.02, Some(Channel), Some(Prune)), (Channel, Prune));
    }

    /// Binary masks written into the graph (`keep_relu_channels`, `keep_relu_positions`)
    /// compute what the training graph computed with those masks, ReLUs are counted only at the
    /// kept units, and the rewritten graph still runs in the native engine.
    #[test]
    fn binary_masks_written_to_the_graph_compute_what_training_computed() {
        let root = env!("CARGO_MANIFEST_DIR");
        let path = format!("{root}/models/vgg.onnx");
        let model = crate::frontend::load_model(std::path::Path::new(&path)).unwrap();
        let sample = [1usize, 28, 28];
        let xs: Vec<f32> = (0..2 * 784).map(|i| ((i * 7919) % 255) as f32 / 64.0 - 2.0).collect();
        for granularity in [Granularity::Channel, Granularity::Pixel] {
            let mut graph = TrainGraph::new(&model).unwrap();
            let x = Tensor::from_slice(&xs, (2, 1, 28, 28), graph.device()).unwrap();
            let sites = graph.insert_relu_masks(&x.narrow(0, 0, 1).unwrap(), granularity).unwrap();
            assert_eq!(sites.len(), 6, "{granularity}");
            // Site 0 keeps about 30% of its units, site 1 none, the others all.
            let kept: Vec<Vec<usize>> = sites
                .iter()
                .enumerate()
                .map(|(s, site)| match s {
                    0 => (0..site.units()).filter(|u| (u * 7) % 10 < 3).collect(),
                    1 => vec![],
                    _ => (0..site.units()).collect(),
                })
                .collect();
            let mut model = model.clone();
            let mut relus = 0;
            for (site, kept) in sites.iter().zip(&kept) {
                let mut a = vec![0f32; site.units()];
                for &u in kept {
                    a[u] = 1.0;
                }
                let var = &graph.masks()[&site.relu];
                var.set(&Tensor::from_vec(a, site.mask_dims(), graph.device()).unwrap()).unwrap();
                let keep = match granularity {
                    Granularity::Channel => crate::passes::channel_thin::keep_relu_channels,
                    Granularity::Pixel => crate::passes::channel_thin::keep_relu_positions,
                };
                keep(&mut model, &site.relu, &site.input, &site.dims, kept);
                relus += kept.len() * site.relus_per_unit();
            }
            let want: Vec<f32> =
                graph.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let census = crate::analysis::census::census(&model, &sample).unwrap();
            assert_eq!(census.total_relus, relus as u64, "{granularity}");
            let engine = crate::exec::engine::Engine::new(&model, &sample).unwrap();
            let (got, _) = engine.run(&xs).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{granularity}: {g} vs {w}");
            }
        }
    }
}
