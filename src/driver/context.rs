//! What one driver run shares between its phases (search, passes, fine-tuning, measuring):
//! the original model, the data splits it reads, each read once however many phases use it,
//! and the original's outputs on the test images, run once however many reports compare
//! against it.

use super::DataOptions;
use crate::data::{Dataset, Normalisation, Split};
use crate::error::{CompileError, ExitCode};
use crate::eval::evaluator::{accuracy_of, evaluate_against, Outputs};
use crate::eval::RunSpec;
use crate::ir::Model;
use anyhow::Result;
use std::sync::{Arc, Mutex, OnceLock};

/// The accuracy below which an original counts as near chance for `classes` classes: three
/// times chance, but at most a fifth of the way from chance to 100% (two classes: 60%). The
/// shipped ResNet fed pixel/255 instead of its normalisation scores 19.6% on Fashion-MNIST's
/// 10 classes (21.5% on the first 200 images; 94.0% fed right), under this 28%; no network
/// worth reducing scores that low on the data it was trained for.
pub fn near_chance(classes: usize) -> f64 {
    let chance = 1.0 / classes.max(1) as f64;
    (3.0 * chance).min(chance + 0.2 * (1.0 - chance))
}

/// Refuse (exit 8) an original whose accuracy on `test` is near chance: a gate against that
/// baseline would pass whatever the reduction did.
pub fn refuse_near_chance(
    outputs: &Outputs,
    test: &Dataset,
    name: &str,
    norm: &Normalisation,
) -> Result<()> {
    let classes = outputs.classes.max(1);
    let accuracy = accuracy_of(outputs, test);
    if accuracy >= near_chance(classes) {
        return Ok(());
    }
    Err(CompileError::new(
        ExitCode::Normalisation,
        format!(
            "{name} scores {:.2}% on {} images of {}, near chance for {classes} classes \
             (chance {:.0}%): its inputs are probably not what it was trained on.\n  It was fed \
             {norm} ({}); check --scale/--mean/--std (or --raw-pixels) and --data. Nothing was \
             written.",
            100.0 * accuracy,
            test.len(),
            test.source,
            100.0 / classes as f64,
            norm.source.describe()
        ),
    )
    .into())
}

/// The data of one run: the original model, where its images come from, and the splits once
/// read. Loads are lazy, so a phase that never needs a split never reads it.
pub struct RunData {
    pub original: Model,
    /// Per-sample input shape (batch excluded).
    pub sample: Vec<usize>,
    /// The model as messages name it.
    pub name: String,
    pub spec: String,
    pub options: DataOptions,
    /// Test images measured (`None`: the whole split).
    pub test_limit: Option<usize>,
    splits: Arc<Splits>,
    normalisation: OnceLock<Normalisation>,
    original_on_test: Mutex<Option<Arc<Outputs>>>,
    prepared: Mutex<Option<Arc<Model>>>,
}

/// The splits read so far; shared by runs whose models read the same images.
#[derive(Default)]
struct Splits {
    /// Training images, by the limit they were read with.
    train: Mutex<Vec<(Option<usize>, Arc<Dataset>)>>,
    test: Mutex<Option<Arc<Dataset>>>,
}

impl RunData {
    pub fn new(
        original: Model,
        sample: Vec<usize>,
        name: impl Into<String>,
        (spec, options): (&str, &DataOptions),
        test_limit: Option<usize>,
    ) -> Self {
        RunData {
            original,
            sample,
            name: name.into(),
            spec: spec.to_string(),
            options: options.clone(),
            test_limit,
            splits: Arc::default(),
            normalisation: OnceLock::new(),
            original_on_test: Mutex::new(None),
            prepared: Mutex::new(None),
        }
    }

    /// The same data with `teacher` as the original (pareto's learned points distil from the
    /// prepared graph): `teacher` is fed the original's pixels, and the splits already read
    /// are shared.
    pub fn with_original(&self, teacher: Model) -> RunData {
        let normalisation = OnceLock::new();
        let same_pixels = match self.normalisation() {
            Ok(norm) => normalisation.set(norm).is_ok(),
            Err(_) => false,
        };
        RunData {
            original: teacher,
            sample: self.sample.clone(),
            name: self.name.clone(),
            spec: self.spec.clone(),
            options: self.options.clone(),
            test_limit: self.test_limit,
            splits: if same_pixels { self.splits.clone() } else { Arc::default() },
            normalisation,
            original_on_test: Mutex::new(None),
            prepared: Mutex::new(None),
        }
    }

    /// The original after the preparing passes ([`crate::passes::prepare`]), prepared once:
    /// the graph searches cut candidates from and recalibration matches.
    pub fn prepared(&self) -> Result<Arc<Model>> {
        let mut cache = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache.as_ref() {
            return Ok(m.clone());
        }
        let ctx = crate::passes::PassContext::new(self.sample.clone());
        let m = Arc::new(crate::passes::prepare(&self.original, &ctx)?);
        *cache = Some(m.clone());
        Ok(m)
    }

    /// The normalisation the original is fed with, resolved once; nothing stating it is an
    /// error ([`crate::error::ExitCode::Normalisation`]): every split read, and so every
    /// accuracy measured and every training run, goes through here.
    pub fn normalisation(&self) -> Result<Normalisation> {
        if let Some(norm) = self.normalisation.get() {
            return Ok(norm.clone());
        }
        let norm = self.options.stated_normalisation(&self.original, &self.name, &self.spec)?;
        Ok(self.normalisation.get_or_init(|| norm).clone())
    }

    /// Record the normalisation this run measured with in `model`'s metadata, when a split
    /// was read (the next command on the written model then needs no flags).
    pub fn record_normalisation(&self, model: &mut Model) {
        if let Some(norm) = self.normalisation.get() {
            norm.record_in(model);
        }
    }

    fn load(&self, split: Split, limit: Option<usize>) -> Result<Dataset> {
        let norm = self.normalisation()?;
        self.options.load((&self.spec, split, limit), &norm, &self.sample, &self.name)
    }

    /// The first `limit` images of the training split (`None`: all of it), cut from a larger
    /// read when there was one.
    pub fn train(&self, limit: Option<usize>) -> Result<Arc<Dataset>> {
        let mut cache = self.splits.train.lock().unwrap_or_else(|e| e.into_inner());
        let covers = |read: Option<usize>, set: &Dataset| match (read, limit) {
            (None, _) => true,
            (Some(r), Some(l)) => l <= r || set.len() < r,
            (Some(r), None) => set.len() < r,
        };
        if let Some((_, set)) = cache.iter().find(|(read, set)| covers(*read, set)) {
            return Ok(match limit {
                Some(l) if l < set.len() => Arc::new(set.subset(0..l)),
                _ => set.clone(),
            });
        }
        let set = Arc::new(self.load(Split::Train, limit)?);
        cache.push((limit, set.clone()));
        Ok(set)
    }

    /// The test images (the first [`Self::test_limit`]).
    pub fn test(&self) -> Result<Arc<Dataset>> {
        let mut cache = self.splits.test.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = cache.as_ref() {
            return Ok(set.clone());
        }
        let set = Arc::new(self.load(Split::Test, self.test_limit)?);
        *cache = Some(set.clone());
        Ok(set)
    }

    /// The test images when they have been read already.
    pub fn test_if_read(&self) -> Option<Arc<Dataset>> {
        self.splits.test.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The original's outputs on the test images, computed on first use.
    pub fn original_on_test(&self, progress: bool) -> Result<Arc<Outputs>> {
        let mut cache = self.original_on_test.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = cache.as_ref() {
            return Ok(o.clone());
        }
        let test = self.test()?;
        let (_, mut outputs) = evaluate_against(
            &self.original,
            &self.name,
            None,
            &test,
            RunSpec::default(),
            progress,
        )?;
        outputs.name = self.name.clone();
        refuse_near_chance(&outputs, &test, &self.name, &self.normalisation()?)?;
        let outputs = Arc::new(outputs);
        *cache = Some(outputs.clone());
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn near_chance_is_three_times_chance_capped_for_few_classes() {
        let close = |classes, want: f64| (super::near_chance(classes) - want).abs() < 1e-12;
        assert!(close(10, 0.28) && close(2, 0.6) && close(100, 0.03) && close(1000, 0.003));
    }
}
