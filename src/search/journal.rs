//! Append-only journals (`candidates.jsonl`, `probes.jsonl`): one JSON record a line, flushed
//! as each is done, so a search killed at any moment resumes with every finished record.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Open `path` to append records, first ending a line a kill cut short (its record is
/// unreadable and redone; without the newline it would swallow the next record too).
pub fn open_journal(path: &Path, what: &str) -> Result<std::fs::File> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the {what} journal {}", path.display()))?;
    if ends_cut_short(path)
        .with_context(|| format!("cannot read the {what} journal {}", path.display()))?
    {
        writeln!(file)?;
    }
    Ok(file)
}

/// Whether the file at `path` is not empty and its last byte is not a newline (read alone).
fn ends_cut_short(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// Every whole record in the journals at `paths`, in order (a line a kill cut short does not
/// parse and is left out: its work is redone). A missing journal holds none.
pub fn read_records<T: serde::de::DeserializeOwned>(paths: &[impl AsRef<Path>]) -> Vec<T> {
    let mut out = Vec::new();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(path) else { continue };
        out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_cut_short_does_not_swallow_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"b\":").unwrap();
        let mut f = open_journal(&path, "test").unwrap();
        writeln!(f, "{{\"c\":3}}").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let records: Vec<serde_json::Value> =
            text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        assert_eq!(records, vec![serde_json::json!({"a": 1}), serde_json::json!({"c": 3})]);
    }
}
