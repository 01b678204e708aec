//! `tether report FILE...`: per-tenant (or region, replica, model) usage from usage logs.
//!
//! Reads plain and gzipped (`.gz`, e.g. rotated) files, and files still being written: a last
//! line without its newline is an unfinished record and is skipped, not an error.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::Context;
use tether_metering::{aggregate, GroupBy, Report, ReportRow, UsageRecord};

/// `--by`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum By {
    /// Tenant id.
    Tenant,
    /// Region of the serving replica.
    Region,
    /// Serving replica.
    Replica,
    /// Model.
    Model,
    /// Where the session key came from (`header`, `agent_header`, `prompt_cache_key`,
    /// `user`, `fingerprint`, `none`).
    KeySource,
}

/// `--format`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
    /// Comma-separated values with a header.
    Csv,
}

/// Records of one file, and how many complete lines were not records.
fn read(path: &Path) -> anyhow::Result<(Vec<UsageRecord>, usize)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::new(reader);
    let (mut records, mut bad) = (Vec::new(), 0);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            // The writer is mid-record: not an error.
            break;
        }
        match serde_json::from_slice::<UsageRecord>(&line) {
            Ok(r) => records.push(r),
            Err(_) => bad += 1,
        }
    }
    Ok((records, bad))
}

fn render(report: &Report, by: By, format: Format) -> anyhow::Result<String> {
    let mut rows: Vec<&ReportRow> = report.rows.iter().collect();
    rows.push(&report.total);
    let name = format!("{by:?}").to_lowercase();
    let mut out = String::new();
    match format {
        Format::Json => out = serde_json::to_string_pretty(report)? + "\n",
        Format::Csv => {
            // New columns go last: scripts may read the older ones by position.
            writeln!(out, "{name},requests,unknown_usage,prompt_tokens,cached_tokens,cache_hit_pct,output_tokens,cost_usd,saved_usd,cache_write_tokens,expected_cached_tokens,kept_pct")?;
            for r in rows {
                writeln!(
                    out,
                    "{},{},{},{},{},{:.2},{},{:.6},{:.6},{},{},{}",
                    r.key,
                    r.requests,
                    r.unknown_usage,
                    r.prompt_tokens,
                    r.cached_tokens,
                    r.cache_hit_pct,
                    r.output_tokens,
                    r.cost_micro_usd as f64 / 1e6,
                    r.saved_micro_usd as f64 / 1e6,
                    r.cache_write_tokens,
                    r.expected_cached_tokens,
                    r.kept_pct.map(|p| format!("{p:.2}")).unwrap_or_default()
                )?;
            }
        }
        Format::Table => {
            writeln!(
                out,
                "{name:<16} {:>9} {:>13} {:>13} {:>7} {:>13} {:>12} {:>12} {:>12} {:>13} {:>7}",
                "requests",
                "prompt_tok",
                "cached_tok",
                "hit",
                "cache_write",
                "output_tok",
                "cost_usd",
                "saved_usd",
                "expected_tok",
                "kept"
            )?;
            for r in rows {
                writeln!(
                    out,
                    "{:<16} {:>9} {:>13} {:>13} {:>6.1}% {:>13} {:>12} {:>12.4} {:>12.4} {:>13} {:>7}",
                    r.key,
                    r.requests,
                    r.prompt_tokens,
                    r.cached_tokens,
                    r.cache_hit_pct,
                    r.cache_write_tokens,
                    r.output_tokens,
                    r.cost_micro_usd as f64 / 1e6,
                    r.saved_micro_usd as f64 / 1e6,
                    r.expected_cached_tokens,
                    r.kept_pct
                        .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%"))
                )?;
            }
            if report.total.unknown_usage > 0 {
                writeln!(
                    out,
                    "({} requests with unknown usage)",
                    report.total.unknown_usage
                )?;
            }
        }
    }
    Ok(out)
}

/// Runs `tether report`.
pub fn run(files: &[PathBuf], by: By, format: Format) -> anyhow::Result<String> {
    let mut records = Vec::new();
    for path in files {
        let (mut more, bad) = read(path)?;
        if bad > 0 {
            eprintln!(
                "{}: skipped {bad} lines that are not usage records",
                path.display()
            );
        }
        records.append(&mut more);
    }
    let group = match by {
        By::Tenant => GroupBy::Tenant,
        By::Region => GroupBy::Region,
        By::Replica => GroupBy::Replica,
        By::Model => GroupBy::Model,
        By::KeySource => GroupBy::KeySource,
    };
    render(&aggregate(&records, group), by, format)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line from before the cache-write fields, and an Anthropic line with them.
    const LINES: [&str; 2] = [
        r#"{"ts":"1970-01-01T00:00:00.000Z","tenant":"acme","session":null,"model":"m","region":"eu","replica":"eu-1","outcome":"sticky","status":200,"prompt_tokens":1200,"cached_tokens":1024,"completion_tokens":20,"cost_micro_usd":161,"uncached_cost_micro_usd":630,"latency_ms":12,"ttft_ms":3,"attempts":1,"usage_status":"found"}"#,
        r#"{"ts":"1970-01-01T00:00:00.000Z","tenant":"acme","session":null,"model":"claude","region":"eu","replica":"eu-1","outcome":"sticky","status":200,"prompt_tokens":4096,"cached_tokens":1800,"completion_tokens":503,"cost_micro_usd":15384,"uncached_cost_micro_usd":19833,"latency_ms":12,"ttft_ms":3,"attempts":1,"usage_status":"found","cache_write_tokens":248,"cache_write_5m_tokens":148,"cache_write_1h_tokens":100}"#,
    ];

    fn report() -> Report {
        let records: Vec<UsageRecord> = LINES
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        aggregate(&records, GroupBy::Tenant)
    }

    #[test]
    fn the_table_has_a_cache_write_column() {
        let table = render(&report(), By::Tenant, Format::Table).unwrap();
        let mut lines = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>());
        let (header, acme) = (lines.next().unwrap(), lines.next().unwrap());
        let at = header.iter().position(|h| *h == "cache_write").unwrap();
        assert_eq!(acme.len(), header.len(), "{table}");
        assert_eq!(acme[at], "248", "{table}");
    }

    #[test]
    fn csv_adds_cache_writes_as_the_last_column() {
        let csv = render(&report(), By::Tenant, Format::Csv).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some(
                "tenant,requests,unknown_usage,prompt_tokens,cached_tokens,cache_hit_pct,\
                 output_tokens,cost_usd,saved_usd,cache_write_tokens,expected_cached_tokens,kept_pct"
            )
        );
        assert_eq!(
            lines.next(),
            Some("acme,2,0,5296,2824,53.32,523,0.015545,0.004918,248,0,")
        );
    }

    #[test]
    fn by_replica_shows_what_sticky_turns_kept_of_their_expected_prefix() {
        let line = |replica: &str, cached: u64| {
            format!(
                r#"{{"ts":"1970-01-01T00:00:00.000Z","tenant":"acme","session":null,"model":"m","region":"eu","replica":"{replica}","outcome":"sticky","status":200,"prompt_tokens":2000,"cached_tokens":{cached},"completion_tokens":20,"cost_micro_usd":1,"uncached_cost_micro_usd":2,"latency_ms":12,"ttft_ms":3,"attempts":1,"usage_status":"found","cache_write_tokens":null,"key_source":"header","expected_cached_tokens":1600}}"#
            )
        };
        let records: Vec<UsageRecord> = [line("eu-1", 1600), line("eu-2", 400)]
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let report = aggregate(&records, GroupBy::Replica);
        let table = render(&report, By::Replica, Format::Table).unwrap();
        let mut lines = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>());
        let header = lines.next().unwrap();
        let at = header.iter().position(|h| *h == "kept").unwrap();
        let rows: Vec<_> = lines.collect();
        assert_eq!((rows[0][0], rows[0][at]), ("eu-1", "100.0%"), "{table}");
        assert_eq!((rows[1][0], rows[1][at]), ("eu-2", "25.0%"), "{table}");
        let csv = render(&report, By::Replica, Format::Csv).unwrap();
        assert!(
            csv.contains("\neu-2,1,0,2000,400,20.00,20,0.000001,0.000001,0,1600,25.00\n"),
            "{csv}"
        );
    }
}
