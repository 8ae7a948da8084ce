//! What a search minimises: ReLUs, or the private-inference bytes or latency the cost model
//! estimates. ReLU count is a proxy; a PI user pays in bytes and seconds, where max-pooling
//! weighs as much as the ReLUs (the shipped VGG's pools are 58% of its bytes).

use crate::analysis::census::{census, Census};
use crate::analysis::cost::CostModel;
use crate::ir::Model;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// The cost on a frontier's axis or under a budget.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// ReLUs per image, counted from the graph.
    #[default]
    Relus,
    /// Bytes sent per image, estimated by the cost model.
    Bytes,
    /// Seconds per image, estimated by the cost model.
    Latency,
}

impl Objective {
    /// The axis label of a plot.
    pub fn axis(self) -> &'static str {
        match self {
            Objective::Relus => "ReLUs per image",
            Objective::Bytes => "estimated PI bytes per image",
            Objective::Latency => "estimated PI latency per image (s)",
        }
    }

    /// `value` in this objective's unit, for people.
    pub fn show(self, value: f64) -> String {
        match self {
            Objective::Relus => crate::report::thousands(value as u64),
            Objective::Bytes => format!("{:.1} MB", value / 1e6),
            Objective::Latency => format!("{value:.3} s"),
        }
    }

    /// The cost a search compares candidates by; MaxPool replacement only changes bytes and
    /// latency, so only those searches try it.
    pub fn values_pooling(self) -> bool {
        self != Objective::Relus
    }
}

/// A graph's cost under every objective.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    pub relus: u64,
    /// Estimated bytes per image.
    pub bytes: f64,
    /// Estimated seconds per image.
    pub seconds: f64,
}

impl Cost {
    pub fn of(model: &Model, sample: &[usize], cost_model: &CostModel) -> Result<Self> {
        Ok(Self::from_census(&census(model, sample)?, cost_model))
    }

    /// The cost of a graph whose census is already taken.
    pub fn from_census(c: &Census, cost_model: &CostModel) -> Self {
        let e = cost_model.estimate(c);
        Cost { relus: c.total_relus, bytes: e.bytes, seconds: e.seconds }
    }

    pub fn get(&self, objective: Objective) -> f64 {
        match objective {
            Objective::Relus => self.relus as f64,
            Objective::Bytes => self.bytes,
            Objective::Latency => self.seconds,
        }
    }
}

/// A limit on one objective.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Budget {
    pub objective: Objective,
    /// In the objective's unit: ReLUs, bytes or seconds.
    pub limit: f64,
}

impl Budget {
    /// Parse `text` as a budget on `objective`: a number with an optional unit (`30MB`,
    /// `1.5GB`, `300ms`, `0.3s`, `20000`) or a percentage of the original's cost (`25%`).
    pub fn parse(objective: Objective, text: &str, original: &Cost) -> Result<Self, String> {
        let t = text.trim().replace(['_', ','], "");
        let example = match objective {
            Objective::Relus => "20000 or 25%",
            Objective::Bytes => "30MB, 500KB or 25%",
            Objective::Latency => "0.3s, 300ms or 25%",
        };
        let bad = || format!("'{text}' is not a budget like {example}");
        let number = |s: &str| s.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
        if let Some(p) = t.strip_suffix('%') {
            let p = number(p).filter(|p| *p <= 100.0).ok_or_else(bad)?;
            let limit = original.get(objective) * p / 100.0;
            let limit = if objective == Objective::Relus { limit.floor() } else { limit };
            return Ok(Budget { objective, limit });
        }
        let lower = t.to_ascii_lowercase();
        let units: &[(&str, f64)] = match objective {
            Objective::Relus => &[("", 1.0)],
            // Decimal units, as `inspect` and CrypTen's reports print them; binary ones too.
            Objective::Bytes => &[
                ("gib", 1073741824.0),
                ("mib", 1048576.0),
                ("kib", 1024.0),
                ("gb", 1e9),
                ("mb", 1e6),
                ("kb", 1e3),
                ("b", 1.0),
                ("", 1.0),
            ],
            Objective::Latency => &[("ms", 1e-3), ("s", 1.0), ("", 1.0)],
        };
        for (suffix, scale) in units {
            if let Some(v) = lower.strip_suffix(suffix).and_then(number) {
                if objective == Objective::Relus && v.fract() != 0.0 {
                    return Err(bad());
                }
                return Ok(Budget { objective, limit: v * scale });
            }
        }
        Err(bad())
    }

    pub fn fits(&self, cost: &Cost) -> bool {
        cost.get(self.objective) <= self.limit
    }

    /// "30.0 MB", "0.300 s", "20,000 ReLUs".
    pub fn describe(&self) -> String {
        match self.objective {
            Objective::Relus => format!("{} ReLUs", self.objective.show(self.limit)),
            o => o.show(self.limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: Cost = Cost { relus: 108_544, bytes: 63.6e6, seconds: 0.586 };

    #[test]
    fn budgets_parse_with_units_and_percentages() {
        let p = |o, t| Budget::parse(o, t, &ORIGINAL).map(|b| b.limit);
        assert_eq!(p(Objective::Relus, "25%"), Ok(27_136.0));
        assert_eq!(p(Objective::Relus, "20_000"), Ok(20_000.0));
        assert_eq!(p(Objective::Bytes, "30MB"), Ok(30e6));
        assert_eq!(p(Objective::Bytes, "1.5 GB"), Ok(1.5e9));
        assert_eq!(p(Objective::Bytes, "2MiB"), Ok(2.0 * 1048576.0));
        assert_eq!(p(Objective::Bytes, "50%"), Ok(31.8e6));
        assert_eq!(p(Objective::Latency, "0.3s"), Ok(0.3));
        assert_eq!(p(Objective::Latency, "300ms"), Ok(0.3));
        for (o, bad) in [
            (Objective::Relus, "1.5"),
            (Objective::Relus, "10MB"),
            (Objective::Bytes, "30 parsecs"),
            (Objective::Latency, "-1s"),
            (Objective::Latency, "150%"),
        ] {
            let e = p(o, bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn fits_compares_the_chosen_objective_only() {
        let b = Budget { objective: Objective::Bytes, limit: 30e6 };
        assert!(b.fits(&Cost { relus: 1_000_000, bytes: 29e6, seconds: 9.0 }));
        assert!(!b.fits(&Cost { relus: 0, bytes: 31e6, seconds: 0.0 }));
        assert_eq!(b.describe(), "30.0 MB");
    }
}
