//! Learned ReLU masks (`relucompile linearize`), after SNL (Cho et al., ICML 2022): every
//! masked ReLU computes `a * relu(x) + (1 - a) * x` with a trainable `a` per channel or per
//! pixel (a mask *unit*, see [`Granularity`]), initialised to 1; the distillation loss gains
//! `lambda * sum(a * w)` with `w` a unit's share of the ReLUs, so that a unit is cheap to keep
//! in proportion to what it costs a PI engine. `lambda` follows a controller that walks the
//! soft ReLU count `sum(a * relus_per_unit)` down to the budget over the mask epochs; then the
//! masks are made binary (the units with the largest `a` that fit the budget keep their ReLU)
//! and the graph is rewritten so that only those units compute one, gathered into one dense
//! tensor per layer.

use super::optim::Optimizer;
use super::teacher::Teacher;
use super::{Distiller, EpochRecord, FinetuneOptions, StepHook, BATCHNORM_INIT_IMAGES};
use crate::data::Dataset;
use crate::exec::graph::TrainGraph;
pub use crate::exec::relu_mask::{Granularity, MaskSite};
use crate::ir::Model;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW};
use serde::{Deserialize, Serialize};

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

/// What a mask phase's hook reports at the end.
trait MaskPhase: StepHook {
    /// The soft ReLU count (the kept count when masks are hard).
    fn soft_relus(&self) -> f64;
    /// The penalty's weight (0 without a penalty).
    fn lambda(&self) -> f64;
}

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
    adam: AdamW,
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
        let adam =
            AdamW::new(vars.clone(), ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() })?;
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
}

impl PruneHook {
    /// `vars`: each site's mask, all 1.
    fn new(vars: Vec<Var>, sites: &[MaskSite], budget: u64) -> Self {
        let total = relus_of(sites);
        PruneHook {
            vars,
            relus_per_unit: sites.iter().map(|s| s.relus_per_unit()).collect(),
            importance: sites.iter().map(|s| vec![0.0; s.units()]).collect(),
            kept: sites.iter().map(|s| vec![true; s.units()]).collect(),
            kept_relus: total as u64,
            total: total as u64,
            budget: budget.min(total as u64),
        }
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
        for (s, var) in self.vars.iter().enumerate().filter(|&(s, _)| changed[s]) {
            let values: Vec<f32> =
                self.kept[s].iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
            let t = Tensor::from_vec(values, var.as_tensor().shape(), var.as_tensor().device())?;
            var.set(&t)?;
        }
        Ok(())
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
}

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
                Box::new(PruneHook::new(vars, &sites, self.budget))
            }
        };
        let distiller = Distiller {
            teacher: &teacher,
            teacher_logits: logits.as_deref().map(Vec::as_slice),
            train: self.train,
            options: opts,
            progress: self.progress,
        };
        let mut history = vec![];
        for epoch in 0..opts.epochs {
            history.push(distiller.epoch(&graph, &mut opt, epoch, hook.as_mut())?);
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

    /// The pruning schedule starts at the full count and ends at the budget; pruning drops the
    /// units worth least per ReLU (importance per ReLU, ties in site and unit order), sets
    /// their masks to 0 and stops as soon as the count is within the target.
    #[test]
    fn pruning_drops_the_cheapest_units_per_relu_down_to_the_schedule() {
        let site = |name: &str, c, n| {
            MaskSite::new(name, &format!("{name}_in"), &[c, n], Granularity::Channel)
        };
        let sites = [site("a", 3, 100), site("b", 2, 10)];
        let dev = candle_core::Device::Cpu;
        let vars: Vec<Var> = sites
            .iter()
            .map(|s| Var::ones(s.units(), candle_core::DType::F32, &dev).unwrap())
            .collect();
        let mut hook = PruneHook::new(vars.clone(), &sites, 150);
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
