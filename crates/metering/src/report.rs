//! Aggregating usage records: what `tether report` prints.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::UsageRecord;

/// What to group records by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// Tenant id.
    Tenant,
    /// Region of the serving replica.
    Region,
    /// Serving replica.
    Replica,
    /// Model.
    Model,
    /// Where the session key came from (`key_source`): what each way of naming a session
    /// buys in cache hits.
    KeySource,
}

/// Totals of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReportRow {
    /// The group's key (`-` when the record has none).
    pub key: String,
    /// Records.
    pub requests: u64,
    /// Records whose usage was unknown.
    pub unknown_usage: u64,
    /// Σ prompt tokens (known values only).
    pub prompt_tokens: u64,
    /// Σ cached tokens (records that know both prompt and cached).
    pub cached_tokens: u64,
    /// `cached / prompt` over records that know both, in percent.
    pub cache_hit_pct: f64,
    /// Σ output tokens.
    pub output_tokens: u64,
    /// Σ cost, micro-dollars.
    pub cost_micro_usd: u64,
    /// Σ what the cache saved, micro-dollars.
    pub saved_micro_usd: u64,
    /// Σ input tokens written to the prompt cache (records that report them; part of
    /// `prompt_tokens`, not of `cached_tokens`).
    pub cache_write_tokens: u64,
    /// Σ cached tokens sticky turns should have reported (records with an
    /// `expected_cached_tokens`: the cache-loss detector's expectation).
    pub expected_cached_tokens: u64,
    /// Σ cached tokens those turns reported, each capped at its expectation.
    pub reported_of_expected_tokens: u64,
    /// `reported_of_expected / expected` in percent: how much of the prefix a warm replica
    /// should have held it did hold. `None` without expectations (no sticky turns metered
    /// twice).
    pub kept_pct: Option<f64>,
    #[serde(skip)]
    prompt_with_cached: u64,
}

impl ReportRow {
    fn add(&mut self, r: &UsageRecord) {
        self.requests += 1;
        if r.prompt_tokens.is_none() {
            self.unknown_usage += 1;
        }
        self.prompt_tokens += r.prompt_tokens.unwrap_or(0);
        if let (Some(p), Some(c)) = (r.prompt_tokens, r.cached_tokens) {
            self.prompt_with_cached += p;
            self.cached_tokens += c;
        }
        self.cache_write_tokens += r.cache_write_tokens.unwrap_or(0);
        if let Some(expected) = r.expected_cached_tokens {
            self.expected_cached_tokens += expected;
            self.reported_of_expected_tokens += r.cached_tokens.unwrap_or(0).min(expected);
        }
        self.output_tokens += r.completion_tokens.unwrap_or(0);
        if let (Some(cost), Some(uncached)) = (r.cost_micro_usd, r.uncached_cost_micro_usd) {
            self.cost_micro_usd += cost;
            self.saved_micro_usd += uncached.saturating_sub(cost);
        }
    }

    fn finish(&mut self) {
        self.cache_hit_pct = if self.prompt_with_cached == 0 {
            0.0
        } else {
            100.0 * self.cached_tokens as f64 / self.prompt_with_cached as f64
        };
        self.kept_pct = (self.expected_cached_tokens > 0).then(|| {
            100.0 * self.reported_of_expected_tokens as f64 / self.expected_cached_tokens as f64
        });
    }
}

/// Per-group rows (sorted by key) and the total.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// One row per group.
    pub rows: Vec<ReportRow>,
    /// Everything.
    pub total: ReportRow,
}

/// Aggregates records.
pub fn aggregate<'a>(records: impl IntoIterator<Item = &'a UsageRecord>, by: GroupBy) -> Report {
    let mut groups: BTreeMap<String, ReportRow> = BTreeMap::new();
    let mut total = ReportRow {
        key: "total".into(),
        ..ReportRow::default()
    };
    for r in records {
        let key = match by {
            GroupBy::Tenant => Some(&*r.tenant),
            GroupBy::Region => r.region.as_deref(),
            GroupBy::Replica => r.replica.as_deref(),
            GroupBy::Model => r.model.as_deref(),
            GroupBy::KeySource => Some(tether_affinity::KeySource::label(r.key_source)),
        }
        .unwrap_or("-");
        let row = groups.entry(key.to_owned()).or_insert_with(|| ReportRow {
            key: key.to_owned(),
            ..ReportRow::default()
        });
        row.add(r);
        total.add(r);
    }
    let mut rows: Vec<ReportRow> = groups.into_values().collect();
    rows.iter_mut().for_each(ReportRow::finish);
    total.finish();
    Report { rows, total }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        tenant: &str,
        prompt: Option<u64>,
        cached: Option<u64>,
        cost: Option<(u64, u64)>,
    ) -> UsageRecord {
        UsageRecord {
            ts: crate::Timestamp::from(std::time::UNIX_EPOCH),
            tenant: tenant.into(),
            session: None,
            model: Some("m".into()),
            region: Some("eu".into()),
            replica: None,
            outcome: None,
            status: 200,
            prompt_tokens: prompt,
            cached_tokens: cached,
            completion_tokens: Some(1),
            cost_micro_usd: cost.map(|c| c.0),
            uncached_cost_micro_usd: cost.map(|c| c.1),
            latency_ms: 1,
            ttft_ms: None,
            attempts: 1,
            usage_status: crate::UsageStatus::FOUND,
            cache_write_tokens: None,
            key_source: None,
            cache_write_5m_tokens: None,
            cache_write_1h_tokens: None,
            limit: None,
            expected_cached_tokens: None,
        }
    }

    #[test]
    fn groups_sum_and_the_hit_ratio_ignores_unknown_cached_counts() {
        let records = [
            record("a", Some(100), Some(80), Some((10, 30))),
            record("a", Some(100), None, None),
            record("b", None, None, None),
        ];
        let r = aggregate(&records, GroupBy::Tenant);
        assert_eq!(r.rows.len(), 2);
        let a = &r.rows[0];
        assert_eq!((a.requests, a.prompt_tokens, a.cached_tokens), (2, 200, 80));
        assert_eq!(
            a.cache_hit_pct, 80.0,
            "only the record that knows its cached count"
        );
        assert_eq!((a.cost_micro_usd, a.saved_micro_usd), (10, 20));
        assert_eq!(r.rows[1].unknown_usage, 1);
        assert_eq!(r.total.requests, 3);
        let by_replica = aggregate(&records, GroupBy::Replica);
        assert_eq!(by_replica.rows[0].key, "-");
    }

    #[test]
    fn replicas_show_how_much_of_the_expected_prefix_they_kept() {
        let sticky = |replica: &str, expected: Option<u64>, cached: u64| UsageRecord {
            replica: Some(replica.into()),
            expected_cached_tokens: expected,
            ..record("a", Some(2_000), Some(cached), None)
        };
        let records = [
            sticky("warm", Some(1_000), 1_500),
            sticky("warm", Some(1_000), 900),
            sticky("cold", Some(1_000), 0),
            sticky("cold", Some(1_000), 100),
            // A turn without an expectation (a new session) counts in neither.
            sticky("new", None, 0),
        ];
        let r = aggregate(&records, GroupBy::Replica);
        let row = |key: &str| r.rows.iter().find(|row| row.key == key).unwrap();
        assert_eq!(row("warm").expected_cached_tokens, 2_000);
        assert_eq!(
            row("warm").reported_of_expected_tokens,
            1_900,
            "capped at each turn's expectation"
        );
        assert_eq!(row("warm").kept_pct, Some(95.0));
        assert_eq!(row("cold").kept_pct, Some(5.0));
        assert_eq!(row("new").kept_pct, None);
        assert_eq!(r.total.kept_pct, Some(50.0));
    }

    #[test]
    fn records_group_by_key_source_with_none_for_keyless_ones() {
        let mut fingerprinted = record("a", Some(100), Some(90), None);
        fingerprinted.key_source = Some(tether_affinity::KeySource::Fingerprint);
        let records = [fingerprinted, record("a", Some(100), Some(0), None)];
        let r = aggregate(&records, GroupBy::KeySource);
        let keys: Vec<&str> = r.rows.iter().map(|row| row.key.as_str()).collect();
        assert_eq!(keys, ["fingerprint", "none"]);
        assert_eq!(r.rows[0].cache_hit_pct, 90.0);
    }

    #[test]
    fn cache_writes_sum_where_reported_and_stay_out_of_the_hit_ratio() {
        let mut written = record("a", Some(100), Some(0), Some((13, 10)));
        written.cache_write_tokens = Some(60);
        let mut reads = record("a", Some(100), Some(60), Some((5, 10)));
        reads.cache_write_tokens = Some(0);
        let records = [written, reads, record("a", Some(100), Some(50), None)];
        let a = &aggregate(&records, GroupBy::Tenant).rows[0];
        assert_eq!(a.cache_write_tokens, 60);
        assert_eq!((a.cached_tokens, a.prompt_tokens), (110, 300));
        // What writing cost more than it saved on its own record is not negative saving.
        assert_eq!(a.saved_micro_usd, 5);
    }
}
