//! Benchmark reports: a table for people, `target/bench/<suite>.json` for
//! machines (shape in shared/BENCH.md).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

/// One measured number.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The case, e.g. `stages=10000`.
    pub case: String,
    /// `tessera` or the peer's name.
    pub system: String,
    /// What was measured, unit last (`msgs_per_s`, `latency_us_p99`).
    pub metric: String,
    /// The value (median of the repetitions where repeated).
    pub value: f64,
    /// Unit for people.
    pub unit: String,
}

/// A "higher is better for tessera" ratio between two rows of a case.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// The case.
    pub case: String,
    /// The metric.
    pub metric: String,
    /// System on top.
    pub numerator: String,
    /// System below.
    pub denominator: String,
    /// numerator / denominator.
    pub value: f64,
}

impl Ratio {
    /// The side a ratio is measured against, whose row does not repeat it:
    /// `tessera` if it is a side, else a side named `tessera-...`, else the
    /// denominator.
    fn base(&self) -> &str {
        let sides = [&self.numerator, &self.denominator];
        sides
            .iter()
            .find(|s| s.as_str() == "tessera")
            .or_else(|| sides.iter().find(|s| s.starts_with("tessera")))
            .map_or(self.denominator.as_str(), |s| s.as_str())
    }
}

#[derive(Clone, Debug, Serialize)]
struct Machine {
    cpus: usize,
    kernel: String,
    pinned: bool,
}

/// A suite's results being gathered.
#[derive(Debug, Serialize)]
pub struct Report {
    suite: String,
    commit: String,
    machine: Machine,
    results: Vec<Row>,
    ratios: Vec<Ratio>,
    /// What each system pays that others may not (e.g. `encrypted`), shown
    /// as a column: a suite without labels keeps its old table and JSON.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    notes: Vec<String>,
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Report {
    /// A new report for `suite`; `pinned` says whether the systems under test
    /// ran on pinned cores.
    pub fn new(suite: &str, pinned: bool) -> Self {
        Self {
            suite: suite.into(),
            commit: commit(),
            machine: Machine {
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
                kernel: kernel(),
                pinned,
            },
            results: Vec::new(),
            ratios: Vec::new(),
            labels: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    /// Labels a system (a column of the table, `labels` in the JSON).
    pub fn label(&mut self, system: &str, label: &str) {
        self.labels.insert(system.into(), label.into());
    }

    /// Records a value.
    pub fn push(&mut self, case: &str, system: &str, metric: &str, value: f64, unit: &str) {
        self.results.push(Row {
            case: case.into(),
            system: system.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
        });
    }

    fn value(&self, case: &str, system: &str, metric: &str) -> Option<f64> {
        self.results
            .iter()
            .find(|r| r.case == case && r.system == system && r.metric == metric)
            .map(|r| r.value)
    }

    /// Records `numerator / denominator` for a metric of a case, if both
    /// were measured. For throughput pass (tessera, peer); for a latency or
    /// a cost pass (peer, tessera), so that higher is better for tessera.
    pub fn ratio(&mut self, case: &str, metric: &str, numerator: &str, denominator: &str) {
        if let (Some(n), Some(d)) = (
            self.value(case, numerator, metric),
            self.value(case, denominator, metric),
        ) {
            if d > 0.0 {
                self.ratios.push(Ratio {
                    case: case.into(),
                    metric: metric.into(),
                    numerator: numerator.into(),
                    denominator: denominator.into(),
                    value: n / d,
                });
            }
        }
    }

    /// A line printed under the table and kept in the JSON (how peers were
    /// configured, where each side was pinned, what shares the machine).
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// The table a person reads.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "suite {}  commit {}  cpus {}  kernel {}  pinned {}",
            self.suite, self.commit, self.machine.cpus, self.machine.kernel, self.machine.pinned
        );
        let w_case = self
            .results
            .iter()
            .map(|r| r.case.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let w_metric = self
            .results
            .iter()
            .map(|r| r.metric.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let w_sys = self
            .results
            .iter()
            .map(|r| r.system.len())
            .max()
            .unwrap_or(6)
            .max(6);
        // The label column exists only when some system has a label.
        let w_label = self.labels.values().map(|l| l.len() + 2).max().unwrap_or(0);
        let label_of = |system: &str| match self.labels.get(system) {
            Some(label) => format!("{label:<w$}", w = w_label),
            None => " ".repeat(w_label),
        };
        let _ = writeln!(
            out,
            "{:<w_case$}  {:<w_metric$}  {:<w_sys$}  {}{:>16}  {:<8}  ratio (tessera better if > 1)",
            "case",
            "metric",
            "system",
            if w_label > 0 {
                format!("{:<w$}", "wire", w = w_label)
            } else {
                String::new()
            },
            "value",
            "unit"
        );
        for r in &self.results {
            let ratio = self
                .ratios
                .iter()
                .filter(|x| x.case == r.case && x.metric == r.metric)
                .filter_map(|x| {
                    let other = if x.numerator == r.system {
                        &x.denominator
                    } else if x.denominator == r.system {
                        &x.numerator
                    } else {
                        return None;
                    };
                    (x.base() != r.system).then(|| format!("{:.2}x vs {other}", x.value))
                })
                .collect::<Vec<_>>()
                .join("; ");
            let _ = writeln!(
                out,
                "{:<w_case$}  {:<w_metric$}  {:<w_sys$}  {}{:>16}  {:<8}  {}",
                r.case,
                r.metric,
                r.system,
                label_of(&r.system),
                fmt_value(r.value),
                r.unit,
                ratio
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    /// Prints the table and writes the JSON; returns the JSON's path.
    pub fn finish(&self) -> std::io::Result<PathBuf> {
        print!("{}", self.table());
        let dir = target_dir().join("bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.json", self.suite));
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&path, json)?;
        println!("wrote {}", path.display());
        Ok(path)
    }
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.3e}", v)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// The workspace's target directory (CARGO_TARGET_DIR if set).
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // bench/ sits one level under the workspace root.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("target"))
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// Median of a set of repetitions.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_sets() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn ratio_needs_both_sides() {
        let mut r = Report::new("t", false);
        r.push("c", "tessera", "m", 10.0, "x");
        r.ratio("c", "m", "tessera", "peer");
        assert!(r.ratios.is_empty());
        r.push("c", "peer", "m", 2.0, "x");
        r.ratio("c", "m", "tessera", "peer");
        assert_eq!(r.ratios[0].value, 5.0);
        assert!(r.table().contains("5.00x vs tessera"));
    }

    #[test]
    fn ratios_show_on_the_row_measured_against_the_base() {
        let mut r = Report::new("t", false);
        r.push("c", "tessera", "m", 10.0, "x");
        r.push("c", "tessera-encrypted", "m", 12.0, "x");
        r.push("c", "quinn", "m", 3.0, "x");
        r.ratio("c", "m", "tessera-encrypted", "tessera");
        r.ratio("c", "m", "tessera-encrypted", "quinn");
        r.label("quinn", "encrypted");
        let table = r.table();
        let row = |system: &str| {
            table
                .lines()
                .find(|l| l.split_whitespace().nth(2) == Some(system))
                .unwrap()
                .to_string()
        };
        assert!(row("tessera-encrypted").contains("1.20x vs tessera"));
        assert!(row("quinn").contains("4.00x vs tessera-encrypted"));
        assert!(row("quinn").contains("encrypted"));
        assert!(!row("tessera").contains("vs"));
    }
}
