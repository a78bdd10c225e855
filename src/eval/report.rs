//! An evaluation's results and their three renderings: a human table ([`std::fmt::Display`]),
//! JSON (serde) and CSV ([`Report::csv`]).

use super::edits::{Aggregate, EditReport};
use super::general::TaskResult;
use std::fmt;
use std::path::PathBuf;

/// Version of the JSON report's layout.
pub const SCHEMA: u32 = 1;

/// Everything one `eval` run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub schema: u32,
    pub model: PathBuf,
    /// Ids of the patches overlaid, in order.
    pub patches: Vec<String>,
    pub seed: u64,
    pub limit: Option<usize>,
    pub edits: Option<EditReport>,
    pub general: Vec<TaskResult>,
}

const COUNTERFACT_TITLE: &str = "CounterFact (ROME/MEMIT protocol: probability comparisons; fluency = n-gram entropy, papers print ×100)";
const EASYEDIT_TITLE: &str = "EasyEdit (teacher-forced token accuracy; not comparable with CounterFact)";

impl Report {
    /// Long-format CSV, one value a row: `section,item,metric,value,n`. Sections are
    /// `counterfact`, `easyedit` and task names; `item` is a record number, `mean`, or the task file.
    pub fn csv(&self) -> String {
        let mut out = String::from("section,item,metric,value,n\n");
        let mut row = |section: &str, item: &str, metric: &str, value: f64, n: usize| {
            out += &format!("{},{},{},{value},{n}\n", quote(section), quote(item), quote(metric));
        };
        if let Some(e) = &self.edits {
            for r in &e.records {
                let record = r.record.to_string();
                for (section, metrics) in [("counterfact", r.counterfact.metrics()), ("easyedit", r.easyedit.metrics())] {
                    for (name, value) in metrics {
                        if let Some(v) = value {
                            row(section, &record, name, v, 1);
                        }
                    }
                }
            }
            for (section, aggregates) in [("counterfact", &e.counterfact), ("easyedit", &e.easyedit)] {
                for a in aggregates {
                    row(section, "mean", a.name, a.mean, a.n);
                }
            }
        }
        for t in &self.general {
            for m in &t.metrics {
                row(t.task.name(), &t.path.display().to_string(), m.name, m.value, t.items);
            }
        }
        out
    }
}

/// A CSV field, quoted when it needs to be.
fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// `x` with four decimals, or in scientific notation when that would show only zeros.
fn number(x: f64) -> String {
    if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:.2e}")
    } else {
        format!("{x:.4}")
    }
}

fn aggregates(f: &mut fmt::Formatter, title: &str, rows: &[Aggregate]) -> fmt::Result {
    writeln!(f, "\n{title}")?;
    if rows.is_empty() {
        return writeln!(f, "  (no metric applies to these records)");
    }
    writeln!(f, "  {:<24} {:>10} {:>6}", "metric", "mean", "n")?;
    for a in rows {
        writeln!(f, "  {:<24} {:>10} {:>6}", a.name, number(a.mean), a.n)?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let patches = if self.patches.is_empty() { "none".to_string() } else { self.patches.join(", ") };
        let limit = self.limit.map_or("all items".to_string(), |n| format!("at most {n} items per file, seed {}", self.seed));
        writeln!(f, "model   {}\npatches {patches}\nsubset  {limit}", self.model.display())?;
        if let Some(e) = &self.edits {
            writeln!(f, "\nrequests {} ({} records)", e.path.display(), e.records.len())?;
            aggregates(f, COUNTERFACT_TITLE, &e.counterfact)?;
            aggregates(f, EASYEDIT_TITLE, &e.easyedit)?;
        }
        if !self.general.is_empty() {
            writeln!(f, "\nGeneral tasks")?;
            writeln!(f, "  {:<11} {:>6} {:<12} {:>10}  file", "task", "items", "metric", "value")?;
            for t in &self.general {
                for m in &t.metrics {
                    writeln!(f, "  {:<11} {:>6} {:<12} {:>10}  {}", t.task.name(), t.items, m.name, number(m.value), t.path.display())?;
                }
            }
            for t in &self.general {
                writeln!(f, "  {}: {}", t.task.name(), t.protocol)?;
            }
        }
        Ok(())
    }
}
