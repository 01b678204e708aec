//! What a run measured, and how it prints.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Instant;

use serde::Serialize;

use crate::follow::{region_warm_follow, warm_follow, FleetFacts, WarmFollow};

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Session index.
    pub session: usize,
    /// Tenant index.
    pub tenant: usize,
    /// Turn index (0-based).
    pub turn: usize,
    /// Prompt tokens the replica reported.
    pub prompt_tokens: u64,
    /// Cached prompt tokens the replica reported.
    pub cached_tokens: u64,
    /// What an infinite shared cache would have hit.
    pub oracle_cached_tokens: u64,
    /// Time to first token, milliseconds.
    pub ttft_ms: f64,
    /// The replica that answered (`x-replica-id`), if named.
    pub replica: Option<String>,
    /// When the request was sent.
    pub sent_at: Instant,
    /// When its answer was complete.
    pub answered_at: Instant,
}

/// Totals over a set of requests.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Requests answered with usage.
    pub requests: u64,
    /// Requests that failed (status, transport, missing usage).
    pub errors: u64,
    /// Σ prompt tokens.
    pub prompt_tokens: u64,
    /// Σ cached prompt tokens.
    pub cached_tokens: u64,
    /// Σ oracle cached tokens.
    pub oracle_cached_tokens: u64,
    /// Token-weighted input cache-hit ratio.
    pub hit_ratio: f64,
    /// The oracle's ratio for the same requests.
    pub oracle_ratio: f64,
    /// `hit_ratio / oracle_ratio`.
    pub of_oracle: f64,
    /// TTFT median, ms.
    pub ttft_p50_ms: f64,
    /// TTFT 99th percentile, ms.
    pub ttft_p99_ms: f64,
    #[serde(skip)]
    ttfts: Vec<f64>,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        self.requests += 1;
        self.prompt_tokens += o.prompt_tokens;
        self.cached_tokens += o.cached_tokens;
        self.oracle_cached_tokens += o.oracle_cached_tokens;
        self.ttfts.push(o.ttft_ms);
    }

    fn finish(&mut self) {
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        self.hit_ratio = ratio(self.cached_tokens, self.prompt_tokens);
        self.oracle_ratio = ratio(self.oracle_cached_tokens, self.prompt_tokens);
        self.of_oracle = if self.oracle_ratio == 0.0 {
            0.0
        } else {
            self.hit_ratio / self.oracle_ratio
        };
        self.ttfts.sort_by(f64::total_cmp);
        self.ttft_p50_ms = percentile(&self.ttfts, 0.50);
        self.ttft_p99_ms = percentile(&self.ttfts, 0.99);
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// What one edge of a tier ([`Target::Tier`](crate::Target::Tier)) was sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EdgeTotals {
    /// The edge's base URL.
    pub url: String,
    /// Requests answered with usage.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// A whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Everything.
    pub overall: Totals,
    /// Per tenant (`tenant-0`, …).
    pub tenants: BTreeMap<String, Totals>,
    /// Per turn index.
    pub by_turn: Vec<Totals>,
    /// Per client profile (`header`, `agent_header`, `prompt_cache_key`, `nothing`), when
    /// the run mixed them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_profile: BTreeMap<String, Totals>,
    /// Requests per replica that answered.
    pub by_replica: BTreeMap<String, u64>,
    /// Max / mean of `by_replica`.
    pub replica_max_over_mean: f64,
    /// Per edge, in the order given, for a proxy target (one edge) or a tier; empty when
    /// sending straight to replicas.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub by_edge: Vec<EdgeTotals>,
    /// How often a turn was answered by its session's previous replica ([`crate::follow`]).
    pub warm_follow: WarmFollow,
    /// The same by region, when the run was given a replica → region map.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_warm_follow: Option<WarmFollow>,
    /// The [capacity bound](crate::bound) as a hit ratio, when the run computed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_bound_ratio: Option<f64>,
    /// The tighter bound for separate replica caches
    /// ([`partitioned_capacity_blocks`](crate::bound::partitioned_capacity_blocks)), as a hit
    /// ratio, when the run computed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitioned_bound_ratio: Option<f64>,
    /// Mean time of a client-side router's decision, nanoseconds, for the policies that time
    /// theirs (the prefix-aware ones, [`ClientPolicy::reads_text`](crate::ClientPolicy::reads_text)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_decision_ns: Option<f64>,
    /// Wall time, seconds.
    pub elapsed_secs: f64,
    /// The first few errors, for diagnosis.
    pub error_samples: Vec<String>,
}

impl Report {
    /// Records the capacity bound, in cached tokens over the same requests.
    pub fn set_capacity_bound(&mut self, cached_tokens: u64) {
        self.capacity_bound_ratio = Some(self.ratio_of_prompt(cached_tokens));
    }

    /// Records the partitioned bound, in cached tokens over the same requests.
    pub fn set_partitioned_bound(&mut self, cached_tokens: u64) {
        self.partitioned_bound_ratio = Some(self.ratio_of_prompt(cached_tokens));
    }

    fn ratio_of_prompt(&self, cached_tokens: u64) -> f64 {
        let prompt = self.overall.prompt_tokens;
        if prompt == 0 {
            0.0
        } else {
            cached_tokens as f64 / prompt as f64
        }
    }

    /// Aggregates outcomes and error counts (`errors[(tenant, turn)]`), with no replica
    /// excused and no regions.
    pub fn build(
        outcomes: &[Outcome],
        errors: &BTreeMap<(usize, usize), u64>,
        elapsed_secs: f64,
    ) -> Report {
        Report::build_with(outcomes, errors, elapsed_secs, &FleetFacts::default())
    }

    /// [`build`](Self::build), with the caller's facts for the warm-follow rates.
    pub fn build_with(
        outcomes: &[Outcome],
        errors: &BTreeMap<(usize, usize), u64>,
        elapsed_secs: f64,
        facts: &FleetFacts,
    ) -> Report {
        let mut r = Report {
            elapsed_secs,
            warm_follow: warm_follow(outcomes, &facts.excused),
            region_warm_follow: region_warm_follow(outcomes, facts),
            ..Report::default()
        };
        for o in outcomes {
            r.overall.add(o);
            r.tenants
                .entry(format!("tenant-{}", o.tenant))
                .or_default()
                .add(o);
            if r.by_turn.len() <= o.turn {
                r.by_turn.resize(o.turn + 1, Totals::default());
            }
            r.by_turn[o.turn].add(o);
            if let Some(replica) = &o.replica {
                *r.by_replica.entry(replica.clone()).or_default() += 1;
            }
        }
        for ((tenant, turn), n) in errors {
            r.overall.errors += n;
            r.tenants
                .entry(format!("tenant-{tenant}"))
                .or_default()
                .errors += n;
            if r.by_turn.len() <= *turn {
                r.by_turn.resize(turn + 1, Totals::default());
            }
            r.by_turn[*turn].errors += n;
        }
        r.overall.finish();
        r.tenants.values_mut().for_each(Totals::finish);
        r.by_turn.iter_mut().for_each(Totals::finish);
        if !r.by_replica.is_empty() {
            let max = r.by_replica.values().copied().max().unwrap_or(0) as f64;
            let mean = r.by_replica.values().sum::<u64>() as f64 / r.by_replica.len() as f64;
            r.replica_max_over_mean = max / mean;
        }
        r
    }

    /// Totals per client profile, `profile_of(session)` naming each; kept only when more than
    /// one profile ran.
    pub fn set_profiles(
        &mut self,
        outcomes: &[Outcome],
        profile_of: impl Fn(usize) -> &'static str,
    ) {
        let mut by_profile: BTreeMap<String, Totals> = BTreeMap::new();
        for o in outcomes {
            by_profile
                .entry(profile_of(o.session).to_owned())
                .or_default()
                .add(o);
        }
        by_profile.values_mut().for_each(Totals::finish);
        if by_profile.len() > 1 {
            self.by_profile = by_profile;
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let row = |out: &mut String, name: &str, t: &Totals| {
            let _ = writeln!(
                out,
                "{name:<10} {:>8} {:>6} {:>11} {:>11} {:>7.1}% {:>7.1}% {:>8.1}% {:>9.0} {:>9.0}",
                t.requests,
                t.errors,
                t.prompt_tokens,
                t.cached_tokens,
                t.hit_ratio * 100.0,
                t.oracle_ratio * 100.0,
                t.of_oracle * 100.0,
                t.ttft_p50_ms,
                t.ttft_p99_ms,
            );
        };
        let _ = writeln!(
            out,
            "{:<10} {:>8} {:>6} {:>11} {:>11} {:>8} {:>8} {:>9} {:>9} {:>9}",
            "",
            "requests",
            "errors",
            "prompt_tok",
            "cached_tok",
            "hit",
            "oracle",
            "of_oracle",
            "ttft_p50",
            "ttft_p99"
        );
        for (name, t) in &self.tenants {
            row(&mut out, name, t);
        }
        for (name, t) in &self.by_profile {
            row(&mut out, name, t);
        }
        row(&mut out, "overall", &self.overall);
        if let Some(bound) = self.capacity_bound_ratio {
            let _ = writeln!(
                out,
                "capacity bound (no router could hit more with the fleet's cache): {:.1}%",
                bound * 100.0
            );
        }
        if let Some(bound) = self.partitioned_bound_ratio {
            let _ = writeln!(
                out,
                "partitioned bound (no router could hit more with separate replica caches): {:.1}%",
                bound * 100.0
            );
        }
        let _ = writeln!(out, "\nby turn (hit / oracle):");
        for (i, t) in self.by_turn.iter().enumerate() {
            let _ = writeln!(
                out,
                "  turn {:>2}: {:>5.1}% / {:>5.1}%  ttft p50 {:>6.0} ms",
                i + 1,
                t.hit_ratio * 100.0,
                t.oracle_ratio * 100.0,
                t.ttft_p50_ms
            );
        }
        let _ = writeln!(
            out,
            "\nrequests per replica (max/mean {:.2}): {}",
            self.replica_max_over_mean,
            self.by_replica
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        if self.by_edge.len() > 1 {
            let _ = writeln!(
                out,
                "requests per edge: {}",
                self.by_edge
                    .iter()
                    .map(|e| match e.errors {
                        0 => format!("{}={}", e.url, e.requests),
                        n => format!("{}={} ({n} failed)", e.url, e.requests),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        follow_line(
            &mut out,
            "warm-follow (same replica as the previous turn)",
            "replica",
            &self.warm_follow,
        );
        if let Some(rate) = &self.region_warm_follow {
            follow_line(&mut out, "region warm-follow (same region)", "region", rate);
        }
        let _ = writeln!(out, "elapsed {:.1} s", self.elapsed_secs);
        for e in &self.error_samples {
            let _ = writeln!(out, "error: {e}");
        }
        out
    }
}

/// `unit`: what a turn follows, `replica` or `region`.
fn follow_line(out: &mut String, name: &str, unit: &str, rate: &WarmFollow) {
    let _ = write!(
        out,
        "{name}: {:.1}% of {} turns",
        rate.raw_rate * 100.0,
        rate.turns
    );
    let _ = writeln!(
        out,
        "; {:.1}% of the {} whose previous {unit} was not excused",
        rate.eligible_rate * 100.0,
        rate.turns - rate.excused_turns
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(
        tenant: usize,
        turn: usize,
        prompt: u64,
        cached: u64,
        oracle: u64,
        ttft: f64,
    ) -> Outcome {
        let now = Instant::now();
        Outcome {
            session: tenant,
            tenant,
            turn,
            prompt_tokens: prompt,
            cached_tokens: cached,
            oracle_cached_tokens: oracle,
            ttft_ms: ttft,
            replica: Some(format!("r{}", tenant)),
            sent_at: now,
            answered_at: now,
        }
    }

    #[test]
    fn the_capacity_bound_is_a_ratio_of_the_same_prompt_tokens() {
        let mut r = Report::build(&[outcome(0, 0, 400, 100, 300, 1.0)], &BTreeMap::new(), 1.0);
        assert_eq!(r.capacity_bound_ratio, None);
        assert!(!r.table().contains("capacity bound"));
        r.set_capacity_bound(200);
        assert_eq!(r.capacity_bound_ratio, Some(0.5));
        assert!(r.table().contains("capacity bound"), "{}", r.table());
    }

    #[test]
    fn ratios_are_token_weighted_not_request_averaged() {
        let r = Report::build(
            &[
                outcome(0, 0, 100, 0, 0, 10.0),
                outcome(0, 1, 900, 900, 900, 20.0),
            ],
            &BTreeMap::new(),
            1.0,
        );
        assert_eq!(r.overall.hit_ratio, 0.9);
        assert_eq!(r.overall.of_oracle, 1.0);
        assert_eq!(r.by_turn[0].hit_ratio, 0.0);
        assert_eq!(r.by_turn[1].hit_ratio, 1.0);
    }

    #[test]
    fn warm_follow_edges_and_regions_print_when_there_is_something_to_say() {
        let outcomes = [outcome(0, 0, 10, 0, 0, 1.0), outcome(0, 1, 10, 0, 0, 1.0)];
        let mut r = Report::build(&outcomes, &BTreeMap::new(), 1.0);
        assert_eq!((r.warm_follow.turns, r.warm_follow.warm), (1, 1));
        let table = r.table();
        assert!(
            table.contains("warm-follow (same replica as the previous turn): 100.0% of 1 turns"),
            "{table}"
        );
        assert!(!table.contains("region warm-follow") && !table.contains("per edge"));
        let json = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(json["warm_follow"]["raw_rate"], 1.0);
        assert!(json.get("region_warm_follow").is_none() && json.get("by_edge").is_none());

        let facts = FleetFacts {
            regions: [("r0".to_owned(), "x".to_owned())].into(),
            ..FleetFacts::default()
        };
        r = Report::build_with(&outcomes, &BTreeMap::new(), 1.0, &facts);
        r.by_edge = ["http://e0", "http://e1"]
            .map(|url| EdgeTotals {
                url: url.into(),
                requests: 1,
                errors: 0,
            })
            .into();
        r.by_edge[1].errors = 2;
        let table = r.table();
        assert!(
            table.contains("region warm-follow (same region): 100.0%"),
            "{table}"
        );
        assert!(
            table.contains("requests per edge: http://e0=1 http://e1=1 (2 failed)"),
            "{table}"
        );
        let json = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(json["region_warm_follow"]["turns"], 1);
        assert_eq!(json["by_edge"][1]["errors"], 2);
    }

    #[test]
    fn percentiles_and_errors_are_reported_per_tenant() {
        let outcomes: Vec<_> = (1..=100)
            .map(|i| outcome(i % 2, 0, 10, 5, 10, i as f64))
            .collect();
        let mut errors = BTreeMap::new();
        errors.insert((1, 3), 2);
        let r = Report::build(&outcomes, &errors, 1.0);
        assert_eq!(r.overall.ttft_p50_ms, 50.0);
        assert_eq!(r.overall.ttft_p99_ms, 99.0);
        assert_eq!(r.overall.errors, 2);
        assert_eq!(r.tenants["tenant-1"].errors, 2);
        assert_eq!(r.by_turn[3].errors, 2);
        assert_eq!(r.replica_max_over_mean, 1.0);
        assert!(r.table().contains("overall"));
    }

    #[test]
    fn profiles_get_a_row_each_only_when_more_than_one_ran() {
        let outcomes = [
            outcome(0, 1, 100, 80, 90, 1.0),
            outcome(1, 1, 100, 0, 90, 1.0),
        ];
        let mut r = Report::build(&outcomes, &BTreeMap::new(), 1.0);
        r.set_profiles(&outcomes, |_| "header");
        assert!(r.by_profile.is_empty());
        r.set_profiles(&outcomes, |s| if s == 0 { "header" } else { "nothing" });
        assert_eq!(r.by_profile["header"].hit_ratio, 0.8);
        assert_eq!(r.by_profile["nothing"].hit_ratio, 0.0);
        assert!(r.table().contains("nothing"));
    }
}
