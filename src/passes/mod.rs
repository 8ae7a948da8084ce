//! Passes and the pass manager.
//!
//! Each pass lives in its own file, has a name a user can write in a pipeline
//! (`--passes 'const-fold,fold-bn,dce'`) and says whether it is lossless. The manager runs the
//! pipeline, verifies the IR after every pass in debug builds or with `--verify-each`, and
//! with `--verify-each` also re-runs the graph to name the first pass that changes outputs.

pub mod channel_thin;
mod const_fold;
mod cull;
mod dce;
mod dedup_relu;
mod fold_bn;
mod identity_elim;
mod maxpool_to_avgpool;
mod nonneg_relu;
pub mod recalibrate;
mod relu_after_maxpool;
mod relu_masks;
mod resolution;
mod thin;
mod width;

pub(crate) use cull::bypass_named;

use crate::error::{CompileError, ExitCode};
use crate::eval::compare::{compare_models, Comparison, LOSSLESS_REL_TOLERANCE};
use crate::ir::{verify, Model};
use anyhow::Result;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One graph rewrite. Its name, whether it is lossless and where it goes in a pipeline are
/// its [`PassInfo`] in the [`REGISTRY`], said once.
pub trait Pass: Send + Sync {
    /// Rewrite `model` in place; returns how many rewrites were made.
    fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<usize>;
}

/// What passes may need besides the graph: analyses such as stages depend on the input shape.
#[derive(Debug, Clone)]
pub struct PassContext {
    /// Per-sample input shape (batch excluded).
    pub sample: Vec<usize>,
    /// Calibration images from the training split, normalised, for data-driven passes.
    pub calibration: Option<Arc<Vec<f32>>>,
    /// The original graph (prepared: BatchNorm folded), which `recalibrate` matches.
    pub reference: Option<Arc<Reference>>,
}

impl PassContext {
    pub fn new(sample: Vec<usize>) -> Self {
        PassContext { sample, calibration: None, reference: None }
    }

    /// A context that fits on the first [`fitting_images`] of the calibration draw `set`, and
    /// the held-out rest of the draw, on which a search scores its candidates.
    pub fn fitted_on(
        sample: Vec<usize>,
        set: &crate::data::Dataset,
        reference: &Model,
    ) -> (Self, crate::data::Dataset) {
        let fit = fitting_images(set.len());
        let ctx = Self::with_data(sample, Arc::new(set.subset(0..fit).images), reference);
        let score = if fit < set.len() { set.subset(fit..set.len()) } else { set.clone() };
        (ctx, score)
    }

    /// With calibration images and the original graph: what data-driven lossy passes need.
    pub fn with_data(sample: Vec<usize>, calibration: Arc<Vec<f32>>, reference: &Model) -> Self {
        PassContext {
            sample,
            calibration: Some(calibration),
            reference: Some(Arc::new(Reference::new(reference.clone()))),
        }
    }
}

/// How many of a draw of `n` calibration images the data-driven passes fit on (recalibration,
/// channel statistics): the first half, at most [`recalibrate::MAX_REFIT_IMAGES`]. A search
/// scores its candidates on the rest: scored on the images it was refitted to, every candidate
/// looks alike (the VGG's 45 latency candidates all scored 123/128 on 128 images).
pub fn fitting_images(n: usize) -> usize {
    if n < 2 {
        n
    } else {
        (n / 2).min(recalibrate::MAX_REFIT_IMAGES)
    }
}

/// The original graph and its per-channel statistics on the calibration images, computed once
/// however many candidates a search recalibrates against it.
pub struct Reference {
    pub model: Model,
    moments: Mutex<Option<Arc<HashMap<String, crate::kernels::stats::Moments>>>>,
    activations: Mutex<Option<Arc<recalibrate::Activations>>>,
}

impl Reference {
    pub fn new(model: Model) -> Self {
        Reference { model, moments: Mutex::new(None), activations: Mutex::new(None) }
    }

    /// Moments of every Conv/Gemm output on `images` (the context's calibration images).
    pub fn moments(
        &self,
        sample: &[usize],
        images: &[f32],
    ) -> Result<Arc<HashMap<String, crate::kernels::stats::Moments>>> {
        let mut cached = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cached.as_ref() {
            return Ok(m.clone());
        }
        let m = Arc::new(recalibrate::reference_moments(&self.model, sample, images)?);
        *cached = Some(m.clone());
        Ok(m)
    }

    /// Outputs of every Conv/Gemm on (at most [`recalibrate::MAX_REFIT_IMAGES`] of) `images`.
    pub fn activations(
        &self,
        sample: &[usize],
        images: &[f32],
    ) -> Result<Arc<recalibrate::Activations>> {
        let mut cached = self.activations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let a = Arc::new(recalibrate::reference_activations(&self.model, sample, images)?);
        *cached = Some(a.clone());
        Ok(a)
    }
}

impl std::fmt::Debug for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reference({} nodes)", self.model.graph.nodes.len())
    }
}

/// Where a pass goes in a pipeline. Lossy steps are placed among a pipeline's lossless ones
/// by phase: structure is cut right after BatchNorm folding (so stage numbers are those
/// `inspect` shows for the input, and a pool replaced before `relu-after-maxpool` keeps its
/// ReLUs in front of it, since moving a ReLU behind an average pool is not lossless), the
/// cleanup moves ReLUs behind the remaining pools, recalibration refits the final structure,
/// channel thinning reads the recalibrated graph's signs, dead nodes go last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Prepare,
    Structural,
    Cleanup,
    Recalibrate,
    ChannelThin,
    Final,
}

/// What a pass needs from its [`PassContext`] besides the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    /// Calibration images (the training split).
    Calibration,
    /// Calibration images and the original graph to match.
    CalibrationAndReference,
}

/// A registry entry: how `relucompile passes` lists a pass and how a pipeline builds and
/// places it.
pub struct PassInfo {
    pub name: &'static str,
    pub lossless: bool,
    pub phase: Phase,
    pub needs: Needs,
    pub description: &'static str,
    pub make: fn(&[String]) -> Result<Box<dyn Pass>>,
}

impl PassInfo {
    /// The registry entry named `name`, or a usage error listing the known passes.
    pub fn named(name: &str) -> Result<&'static PassInfo> {
        REGISTRY.iter().find(|p| p.name == name).ok_or_else(|| {
            let known: Vec<&str> = REGISTRY.iter().map(|p| p.name).collect();
            usage(format!("unknown pass '{name}' in --passes; known passes: {}", known.join(", ")))
        })
    }
}

impl std::fmt::Debug for PassInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for PassInfo {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for PassInfo {}

fn no_args<P: Pass + Default + 'static>(args: &[String]) -> Result<Box<dyn Pass>> {
    if !args.is_empty() {
        return Err(usage(format!("this pass takes no arguments, got ({})", args.join(","))));
    }
    Ok(Box::new(P::default()))
}

/// The one number a pass like `width(0.5)` takes; `example` is shown when it is missing.
pub(crate) fn one_number_arg(args: &[String], pass: &str, example: &str) -> Result<f64> {
    let [arg] = args else {
        return Err(usage(format!("{pass} takes one number, e.g. {example}")));
    };
    arg.parse().map_err(|_| usage(format!("{pass}: '{arg}' is not a number")))
}

pub(crate) fn usage(msg: String) -> anyhow::Error {
    CompileError::new(ExitCode::Usage, msg).into()
}

/// Every pass relucompile knows, in the order of the default pipeline.
pub const REGISTRY: &[PassInfo] = &[
    PassInfo {
        name: "const-fold",
        lossless: true,
        phase: Phase::Prepare,
        needs: Needs::Nothing,
        description: "evaluate weight subgraphs (Constant, ConstantOfShape, arithmetic on weights) into initializers",
        make: no_args::<const_fold::ConstFold>,
    },
    PassInfo {
        name: "identity-elim",
        lossless: true,
        phase: Phase::Prepare,
        needs: Needs::Nothing,
        description: "remove Identity nodes and inference-mode Dropout (PI engines refuse Identity)",
        make: no_args::<identity_elim::IdentityElim>,
    },
    PassInfo {
        name: "fold-bn",
        lossless: true,
        phase: Phase::Prepare,
        needs: Needs::Nothing,
        description: "fold BatchNormalization into the Conv or Gemm before it",
        make: no_args::<fold_bn::FoldBatchNorm>,
    },
    PassInfo {
        name: "relu-after-maxpool",
        lossless: true,
        phase: Phase::Cleanup,
        needs: Needs::Nothing,
        description: "move a ReLU (or ReLU6, LeakyRelu) after the MaxPool it feeds: same outputs, fewer ReLUs",
        make: no_args::<relu_after_maxpool::ReluAfterMaxPool>,
    },
    PassInfo {
        name: "nonneg-relu",
        lossless: true,
        phase: Phase::Cleanup,
        needs: Needs::Nothing,
        description: "remove a ReLU whose input is provably non-negative",
        make: no_args::<nonneg_relu::NonNegRelu>,
    },
    PassInfo {
        name: "dedup-relu",
        lossless: true,
        phase: Phase::Cleanup,
        needs: Needs::Nothing,
        description: "merge ReLU-like nodes that compute the same value from the same input",
        make: no_args::<dedup_relu::DedupRelu>,
    },
    PassInfo {
        name: "dce",
        lossless: true,
        phase: Phase::Final,
        needs: Needs::Nothing,
        description: "dead-node elimination: drop nodes and weights no output depends on",
        make: no_args::<dce::DeadNodes>,
    },
    PassInfo {
        name: "cull",
        lossless: false,
        phase: Phase::Structural,
        needs: Needs::Nothing,
        description: "cull(1,2): remove every ReLU of the given stages (stage 0 is the stem), making them linear",
        make: cull::Cull::from_args,
    },
    PassInfo {
        name: "thin",
        lossless: false,
        phase: Phase::Structural,
        needs: Needs::Nothing,
        description: "thin(bottom|top|alternate[,stages]): drop the ReLU after each residual add (bottom), after each block's first conv (top), or every other ReLU layer (alternate)",
        make: thin::Thin::from_args,
    },
    PassInfo {
        name: "relu-masks",
        lossless: false,
        phase: Phase::Structural,
        needs: Needs::Nothing,
        description: "relu-masks(masks.json): keep ReLUs only on the units (channels or positions) a learned mask file names (linearize's checkpoint, pareto --learned's points); the weights are not changed",
        make: relu_masks::ReluMasks::from_args,
    },
    PassInfo {
        name: "resolution",
        lossless: false,
        phase: Phase::Structural,
        needs: Needs::Nothing,
        description: "resolution(0.5): run the network on its input average-pooled by 1/factor per side (ReLUs and MACs fall by the factor squared)",
        make: resolution::Resolution::from_args,
    },
    PassInfo {
        name: "width",
        lossless: false,
        phase: Phase::Structural,
        needs: Needs::Nothing,
        description: "width(0.5): every channel group (a residual stream, a block's inner layer) keeps that fraction of its channels, the most active on calibration images (else the largest filters)",
        make: width::Width::from_args,
    },
    PassInfo {
        name: "maxpool-to-avgpool",
        lossless: false,
        phase: Phase::Structural,
        needs: Needs::Nothing,
        description: "replace every MaxPool by an AveragePool of the same window (secure max-pooling is a tree of comparisons; averaging is linear)",
        make: no_args::<maxpool_to_avgpool::MaxPoolToAvgPool>,
    },
    PassInfo {
        name: "recalibrate",
        lossless: false,
        phase: Phase::Recalibrate,
        needs: Needs::CalibrationAndReference,
        description: "recalibrate(refit|rectified|scale|mean): refit every Conv/Gemm's weights by least squares to the original graph's output on calibration images (the rectified output where its ReLU was removed); or only map each output channel's mean and scale; runs after lossy passes by default",
        make: recalibrate::Recalibrate::from_args,
    },
    PassInfo {
        name: "channel-thin",
        lossless: false,
        phase: Phase::ChannelThin,
        needs: Needs::Calibration,
        description: "channel-thin(0.99): per channel, from calibration images, keep ReLU only where the input's sign varies; identity or zero elsewhere",
        make: channel_thin::ChannelThin::from_args,
    },
];

/// The lossless passes that run before any lossy one, so that stages, calibration statistics
/// and accuracy are measured on the graph the lossy passes will rewrite.
pub const PREPARE_PIPELINE: &str = "const-fold,identity-elim,fold-bn";

/// `model` after [`PREPARE_PIPELINE`].
pub fn prepare(model: &Model, ctx: &PassContext) -> Result<Model> {
    let mut prepared = model.clone();
    run_pipeline(
        &mut prepared,
        &Pipeline::parse(PREPARE_PIPELINE)?,
        ctx,
        &VerifyOptions::default(),
    )?;
    Ok(prepared)
}

/// The lossless passes a reduced graph gets after the structural lossy passes; channel
/// thinning comes after them so that ReLUs have already moved behind max-pools.
pub const AFTER_STRUCTURAL: &str = "relu-after-maxpool,nonneg-relu,dedup-relu,dce";

/// The pipeline `relucompile in.onnx -o out.onnx` runs when no `--passes` is given.
pub const DEFAULT_PIPELINE: &str =
    "const-fold,identity-elim,fold-bn,relu-after-maxpool,nonneg-relu,dedup-relu,dce";

/// One step of a pipeline: a registered pass and its arguments. Written `name` or
/// `name(arg,arg)`; this type alone prints and parses that text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub pass: &'static PassInfo,
    pub args: Vec<String>,
}

impl Step {
    /// The step `name(args)`, or a usage error naming an unknown pass.
    pub fn new<A: ToString>(name: &str, args: impl IntoIterator<Item = A>) -> Result<Step> {
        let args = args.into_iter().map(|a| a.to_string()).collect();
        Ok(Step { pass: PassInfo::named(name)?, args })
    }

    /// The step `name`, without arguments.
    pub fn named(name: &str) -> Result<Step> {
        Ok(Step { pass: PassInfo::named(name)?, args: Vec::new() })
    }

    /// Parse `name,name(arg,arg),...`.
    pub fn parse_list(text: &str) -> Result<Vec<Step>> {
        split_pipeline(text)?.into_iter().map(|(name, args)| Step::new(&name, args)).collect()
    }

    /// Steps as pipeline text.
    pub fn list_text(steps: &[Step]) -> String {
        steps.iter().map(Step::to_string).collect::<Vec<_>>().join(",")
    }

    fn build(&self) -> Result<Box<dyn Pass>> {
        (self.pass.make)(&self.args).map_err(|e| usage(format!("pass '{}': {e}", self.pass.name)))
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.pass.name)?;
        if !self.args.is_empty() {
            write!(f, "({})", self.args.join(","))?;
        }
        Ok(())
    }
}

/// `base` with `lossy` steps placed by [`Phase`]: each after the last step of `base` whose
/// phase is not later than its own (the lossless steps keep the order they were given in),
/// lossy steps of one phase in their given order; a late step (recalibration, channel
/// thinning) asked for twice runs once.
pub fn place_lossy(base: &[Step], lossy: &[Step]) -> Vec<Step> {
    let mut lossy: Vec<&Step> = lossy.iter().collect();
    lossy.sort_by_key(|s| s.pass.phase);
    lossy.dedup_by(|a, b| a == b && a.pass.phase > Phase::Structural);
    let mut steps: Vec<Step> = base.to_vec();
    for step in lossy {
        // After the last step of an earlier or equal phase (placed lossy steps included).
        let at = steps.iter().rposition(|s| s.pass.phase <= step.pass.phase).map_or(0, |i| i + 1);
        steps.insert(at, step.clone());
    }
    steps
}

/// The pipeline of a lossy configuration: `lossy` (pipeline text) placed in `base` by phase,
/// followed by recalibration when asked for and there is anything lossy. What `compile`'s
/// lossy flags run, and so what a frontier point's replay names.
pub fn lossy_pipeline(base: &str, lossy: &str, recalibrate: bool) -> Result<Vec<Step>> {
    let mut steps = if lossy.is_empty() { Vec::new() } else { Step::parse_list(lossy)? };
    if recalibrate && !steps.is_empty() {
        steps.push(Step::named("recalibrate")?);
    }
    Ok(place_lossy(&Step::parse_list(base)?, &steps))
}

/// A parsed pipeline: steps with their passes built, printable back as text.
pub struct Pipeline {
    pub steps: Vec<(Step, Box<dyn Pass>)>,
}

impl Pipeline {
    /// Parse `name,name(arg,arg),...`.
    pub fn parse(text: &str) -> Result<Self> {
        Self::new(Step::parse_list(text)?)
    }

    /// Build every step's pass (a bad argument is a usage error naming the pass).
    pub fn new(steps: Vec<Step>) -> Result<Self> {
        let steps = steps
            .into_iter()
            .map(|step| {
                let pass = step.build()?;
                Ok((step, pass))
            })
            .collect::<Result<_>>()?;
        Ok(Pipeline { steps })
    }

    pub fn text(&self) -> String {
        self.steps.iter().map(|(s, _)| s.to_string()).collect::<Vec<_>>().join(",")
    }

    /// Whether any step changes outputs.
    pub fn lossy(&self) -> bool {
        self.steps.iter().any(|(s, _)| !s.pass.lossless)
    }

    /// Whether the last step that changes outputs is the refit to the original.
    pub fn ends_refitted(&self) -> bool {
        let last_lossy = self.steps.iter().rev().find(|(s, _)| !s.pass.lossless);
        last_lossy.is_some_and(|(s, _)| s.pass.name == "recalibrate")
    }

    /// Whether any step needs calibration images.
    pub fn needs_calibration(&self) -> bool {
        self.steps.iter().any(|(s, _)| s.pass.needs != Needs::Nothing)
    }

    /// A usage error naming the first step whose needs `ctx` does not meet, before any runs.
    pub fn check_context(&self, ctx: &PassContext) -> Result<()> {
        for (step, _) in &self.steps {
            let missing = match step.pass.needs {
                Needs::Nothing => None,
                _ if ctx.calibration.is_none() => Some("calibration images"),
                Needs::CalibrationAndReference if ctx.reference.is_none() => {
                    Some("the original graph")
                }
                _ => None,
            };
            if let Some(what) = missing {
                let fix = match step.pass.name {
                    "recalibrate" => "give --data with a training split, or --no-recalibrate",
                    _ => "give --data with a training split",
                };
                return Err(usage(format!("{} needs {what}; {fix}", step.pass.name)));
            }
        }
        Ok(())
    }
}

/// `name,name(arg,arg),...` as (name, arguments) pairs.
fn split_pipeline(text: &str) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let end_name = rest.find([',', '(']).unwrap_or(rest.len());
        let name = rest[..end_name].trim().to_string();
        if name.is_empty() {
            return Err(usage(format!("empty pass name in --passes '{text}'")));
        }
        rest = &rest[end_name..];
        let mut args = Vec::new();
        if let Some(after) = rest.strip_prefix('(') {
            let close = after
                .find(')')
                .ok_or_else(|| usage(format!("missing ')' in --passes '{text}'")))?;
            args = after[..close]
                .split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect();
            rest = &after[close + 1..];
        }
        rest = rest.trim_start().strip_prefix(',').unwrap_or(rest).trim_start();
        out.push((name, args));
    }
    if out.is_empty() {
        return Err(usage("--passes is empty".into()));
    }
    Ok(out)
}

/// What one pass did.
#[derive(Debug, Clone, Serialize)]
pub struct PassRecord {
    pub pass: String,
    pub rewrites: usize,
    pub nodes_after: usize,
    /// With `--verify-each`: the outputs compared with the graph before this pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Comparison>,
}

/// How the manager checks between passes.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Verify the IR after every pass (always on in debug builds).
    pub structure: bool,
    /// Also compare outputs after every lossless pass on these inputs (whole samples).
    pub outputs: Option<Vec<f32>>,
}

/// Run `pipeline` on `model`, verifying between passes as asked.
pub fn run_pipeline(
    model: &mut Model,
    pipeline: &Pipeline,
    ctx: &PassContext,
    opts: &VerifyOptions,
) -> Result<Vec<PassRecord>> {
    pipeline.check_context(ctx)?;
    let mut records = Vec::new();
    for (step, pass) in &pipeline.steps {
        let name = step.pass.name;
        let before = opts.outputs.as_ref().map(|_| model.clone());
        let rewrites = pass.run(model, ctx).map_err(|e| e.context(format!("in pass '{name}'")))?;
        if opts.structure || cfg!(debug_assertions) {
            verify(model).map_err(|e| {
                CompileError::new(
                    ExitCode::Internal,
                    format!("pass '{name}' produced an invalid graph: {e}"),
                )
            })?;
        }
        let mut check = None;
        if let (Some(inputs), Some(before)) = (&opts.outputs, before) {
            if step.pass.lossless && rewrites > 0 {
                let cmp = compare_models(&before, model, &ctx.sample, inputs)?;
                if !cmp.within(LOSSLESS_REL_TOLERANCE) {
                    return Err(CompileError::new(
                        ExitCode::OutputMismatch,
                        format!(
                            "pass '{name}' changed the outputs (max abs difference {:.3e}): \
                             it is the first pass that breaks the graph",
                            cmp.max_abs_diff
                        ),
                    )
                    .into());
                }
                check = Some(cmp);
            }
        }
        records.push(PassRecord {
            pass: name.to_string(),
            rewrites,
            nodes_after: model.graph.nodes.len(),
            check,
        });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_text_round_trips() {
        let p = Pipeline::parse(" const-fold, fold-bn ,dce").unwrap();
        assert_eq!(p.text(), "const-fold,fold-bn,dce");
        assert_eq!(Pipeline::parse(DEFAULT_PIPELINE).unwrap().text(), DEFAULT_PIPELINE);
    }

    #[test]
    fn pipeline_arguments_are_split() {
        let parts = split_pipeline("a(1,2),b,c(x)").unwrap();
        assert_eq!(parts[0], ("a".to_string(), vec!["1".to_string(), "2".to_string()]));
        assert_eq!(parts[1], ("b".to_string(), vec![]));
        assert_eq!(parts[2], ("c".to_string(), vec!["x".to_string()]));
    }

    #[test]
    fn lossy_steps_are_placed_around_the_lossless_ones() {
        let place = |base: &str, lossy: &str| {
            let placed =
                place_lossy(&Step::parse_list(base).unwrap(), &Step::parse_list(lossy).unwrap());
            Step::list_text(&placed)
        };
        assert_eq!(
            place(DEFAULT_PIPELINE, "cull(1,2),channel-thin(0.9),thin(bottom)"),
            "const-fold,identity-elim,fold-bn,cull(1,2),thin(bottom),relu-after-maxpool,\
             nonneg-relu,dedup-relu,channel-thin(0.9),dce"
        );
        assert_eq!(
            place(AFTER_STRUCTURAL, "thin(bottom)"),
            format!("thin(bottom),{AFTER_STRUCTURAL}")
        );
        assert_eq!(
            place(
                DEFAULT_PIPELINE,
                "channel-thin(0.9),recalibrate,resolution(0.5),maxpool-to-avgpool,recalibrate"
            ),
            "const-fold,identity-elim,fold-bn,resolution(0.5),maxpool-to-avgpool,\
             relu-after-maxpool,nonneg-relu,dedup-relu,recalibrate,channel-thin(0.9),dce"
        );
    }

    #[test]
    fn a_missing_requirement_is_named_before_any_pass_runs() {
        let pipeline = Pipeline::parse("dce,recalibrate").unwrap();
        let err = pipeline.check_context(&PassContext::new(vec![1, 4, 4])).err().unwrap();
        let text = format!("{err:#}");
        assert!(text.contains("recalibrate needs calibration images"), "{text}");
        assert!(Pipeline::parse(DEFAULT_PIPELINE)
            .unwrap()
            .check_context(&PassContext::new(vec![1, 4, 4]))
            .is_ok());
    }

    #[test]
    fn unknown_pass_is_named() {
        let err = Pipeline::parse("fold-bn,frobnicate").err().unwrap();
        assert!(format!("{err:#}").contains("frobnicate"));
        assert!(Pipeline::parse("dce(3)").is_err());
        assert!(Pipeline::parse("fold-bn(").is_err());
    }
}
