//! Output for people (aligned tables) and machines (JSON).

pub mod plot;

use crate::analysis::census::Census;

/// Group digits in threes: 108544 -> "108,544".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A plain-text table with right-aligned numeric columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let numeric =
        |s: &str| s.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+');
    let fmt_row = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(
                |(i, (c, &w))| {
                    if i > 0 && numeric(c) {
                        format!("{c:>w$}")
                    } else {
                        format!("{c:<w$}")
                    }
                },
            )
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = fmt_row(headers.to_vec());
    out.push('\n');
    out.push_str(&widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().join("  "));
    out.push('\n');
    for row in rows {
        out.push_str(&fmt_row(row.iter().map(|s| s.as_str()).collect()));
        out.push('\n');
    }
    out
}

fn shape_text(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

/// The census as `inspect` prints it: one row per ReLU layer, then per stage, then totals.
pub fn census_text(c: &Census) -> String {
    let rows: Vec<Vec<String>> = c
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.op.clone(),
                n.stage.to_string(),
                shape_text(&n.shape),
                thousands(n.relus),
            ]
        })
        .collect();
    let mut out = format!("ReLU layers (input {}):\n", shape_text(&c.input_shape));
    out += &table(&["node", "op", "stage", "shape", "relus"], &rows);
    let stage_rows: Vec<Vec<String>> = c
        .stages
        .iter()
        .map(|s| {
            let name = if s.index == 0 && c.residual {
                "0 (stem)".to_string()
            } else {
                s.index.to_string()
            };
            vec![
                name,
                format!("{}x{}", s.resolution[0], s.resolution[1]),
                s.relu_layers.to_string(),
                thousands(s.relus),
                thousands(s.macs),
            ]
        })
        .collect();
    out += "\nStages:\n";
    out += &table(&["stage", "resolution", "layers", "relus", "macs"], &stage_rows);
    out += &format!(
        "\nTotal: {} ReLUs, {} MACs per sample",
        thousands(c.total_relus),
        thousands(c.total_macs)
    );
    if c.leaky_relus > 0 {
        out += &format!(" (+{} LeakyRelu/PRelu elements, counted apart)", thousands(c.leaky_relus));
    }
    out.push('\n');
    out
}

/// Estimated PI cost: the costliest layers, then the totals.
pub fn cost_text(c: &crate::analysis::cost::CostEstimate) -> String {
    /// Layers listed by name; the rest are summed in the totals.
    const SHOWN: usize = 12;
    let mut layers: Vec<&crate::analysis::cost::LayerCost> = c.layers.iter().collect();
    layers.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.name.cmp(&b.name)));
    let rows: Vec<Vec<String>> = layers
        .iter()
        .take(SHOWN)
        .map(|l| {
            vec![
                l.name.clone(),
                l.op.clone(),
                format!("{:.2}", l.bytes / 1e6),
                format!("{:.0}", l.rounds),
                format!("{:.1}", 1e3 * l.seconds),
            ]
        })
        .collect();
    let mut out = format!("\nEstimated private-inference cost ({}), costliest layers:\n", c.engine);
    out += &table(&["node", "op", "MB sent", "rounds", "ms"], &rows);
    out += &format!(
        "Total (estimate): {:.2} MB sent, {:.0} rounds, {:.3} s per image\n",
        c.bytes / 1e6,
        c.rounds,
        c.seconds
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(108544), "108,544");
        assert_eq!(thousands(2308096), "2,308,096");
    }
}
