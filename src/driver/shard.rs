//! One shard of a frontier search (`pareto --shard I/N`): which shard a process is, from its
//! flag or from the scheduler that started it (a Slurm array task, a Kubernetes Indexed Job).
//! relucompile keeps no cluster of its own: any scheduler that can start N copies of a
//! command with a shared directory runs a sharded search.

use crate::error::{CompileError, ExitCode};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Shard `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `I/N`, 0 <= I < N.
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or_else(|| format!("`{s}` is not I/N (e.g. 0/4)"))?;
        let parse = |v: &str, what: &str| {
            v.trim().parse::<usize>().map_err(|_| format!("`{s}`: the {what} `{v}` is not a count"))
        };
        Shard::new(parse(i, "index")?, parse(n, "count")?)
    }
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Self, String> {
        if count == 0 || index >= count {
            return Err(format!(
                "shard {index}/{count}: the index counts from 0 and must be below the count"
            ));
        }
        Ok(Shard { index, count })
    }

    /// Whether work item `item` (in the search's deterministic order) is this shard's: items
    /// are dealt round-robin, so every shard gets every N-th of the trained points.
    pub fn owns(&self, item: usize) -> bool {
        item % self.count == self.index
    }

    /// The directory of this shard's own journals, under the search directory.
    pub fn dir_name(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }

    /// The shard a scheduler started this process as, with the variables it came from:
    /// `SLURM_ARRAY_TASK_ID` (less `SLURM_ARRAY_TASK_MIN`) of `SLURM_ARRAY_TASK_COUNT`, or a
    /// Kubernetes Indexed Job's `JOB_COMPLETION_INDEX` of `count` (`--shards`, since the job's
    /// size is not in its environment). `None` outside both.
    pub fn from_environment(count: Option<usize>) -> Result<Option<(Shard, &'static str)>> {
        Self::from_variables(|name| std::env::var(name).ok(), count)
    }

    fn from_variables(
        var: impl Fn(&str) -> Option<String>,
        count: Option<usize>,
    ) -> Result<Option<(Shard, &'static str)>> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        usage(format!("the environment variable {name}={v} is not a count"))
                    })
                })
                .transpose()
        };
        let made = |index: usize, count: usize, from: &'static str| {
            Shard::new(index, count)
                .map(|s| Some((s, from)))
                .map_err(|e| usage(format!("{from}: {e}")))
        };
        if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
            let from = "SLURM_ARRAY_TASK_ID";
            let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let total = match count {
                Some(n) => n,
                None => number("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                    usage("SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT; give --shards N")
                })?,
            };
            let index = id.checked_sub(min).ok_or_else(|| {
                usage(format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"))
            })?;
            return made(index, total, from);
        }
        if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            let from = "JOB_COMPLETION_INDEX";
            let total = count.ok_or_else(|| {
                usage(
                    "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but the shard count \
                     is not: give --shards N with N the job's completions",
                )
            })?;
            return made(index, total, from);
        }
        match count {
            Some(n) => Err(usage(format!(
                "--shards {n} gives the count, but neither SLURM_ARRAY_TASK_ID nor \
                 JOB_COMPLETION_INDEX gives this process's index; use --shard I/{n}"
            ))),
            None => Ok(None),
        }
    }
}

fn usage(message: impl Into<String>) -> anyhow::Error {
    CompileError::new(ExitCode::Usage, message.into()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)], count: Option<usize>) -> Result<Option<(Shard, &'static str)>> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Shard::from_variables(|k| vars.get(k).cloned(), count)
    }

    #[test]
    fn shards_parse_and_deal_items_round_robin() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert_eq!((0..7).filter(|&i| s.owns(i)).collect::<Vec<_>>(), vec![1, 4]);
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn schedulers_name_the_shard() {
        let slurm = [("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_COUNT", "4")];
        let with_min = [slurm[0], slurm[1], ("SLURM_ARRAY_TASK_MIN", "3")];
        assert_eq!(from(&with_min, None).unwrap().unwrap().0, Shard { index: 2, count: 4 });
        assert!(from(&slurm, None).is_err(), "index 5 of 4 without a minimum");
        let k8s = [("JOB_COMPLETION_INDEX", "2")];
        assert_eq!(
            from(&k8s, Some(3)).unwrap().unwrap(),
            (Shard { index: 2, count: 3 }, "JOB_COMPLETION_INDEX")
        );
        assert!(from(&k8s, None).is_err(), "an Indexed Job needs the count");
        assert!(from(&[], Some(2)).is_err(), "a count without an index");
        assert!(from(&[], None).unwrap().is_none());
        assert!(from(&[("JOB_COMPLETION_INDEX", "x")], Some(2)).is_err());
    }
}
