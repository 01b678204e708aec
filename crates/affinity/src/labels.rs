//! The two enums that cross this crate's border by name: a replica's [`Admission`] comes in
//! from the topology file (`state: draining`), a decision's [`Outcome`] goes out to the usage
//! log and the metrics (`"outcome":"sticky"`). Each spelling is written here once: `as_str`
//! and serde agree, and the tests hold them to it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A replica's hard cap on requests in flight (`max_inflight` in the topology file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightCap {
    /// This many requests.
    Fixed(u32),
    /// The sequences its engine runs at once (llama.cpp's slots, SGLang's maximum running
    /// requests), as its latest reading says; no cap while there is none.
    Auto,
}

/// Whether a replica takes new work: a replica's `state` in the topology file (`active`,
/// `draining`, `disabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admission {
    /// Takes new sessions and keeps its own.
    #[default]
    Active,
    /// Finishes what it has; new sessions and next turns of its sessions go elsewhere.
    Draining,
    /// Out of service.
    Disabled,
}

impl Admission {
    /// The name the topology file uses.
    pub const fn as_str(self) -> &'static str {
        match self {
            Admission::Active => "active",
            Admission::Draining => "draining",
            Admission::Disabled => "disabled",
        }
    }
}

impl fmt::Display for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a new session's home region is chosen (`affinity.placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// The region of the key's owner on the global ring: every edge computes the same home
    /// without talking to the others.
    #[default]
    Hash,
    /// The edge's own region when it has room (a replica under the fleet-wide load bound),
    /// else the next region in configured order. Only the edge that placed a session knows
    /// where, so later turns on other edges need the shared sticky store to follow it.
    Nearest,
}

impl Placement {
    /// The name the topology file uses.
    pub const fn as_str(self) -> &'static str {
        match self {
            Placement::Hash => "hash",
            Placement::Nearest => "nearest",
        }
    }
}

/// Where a region's KV cache lives (`regions[].kv_scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvScope {
    /// In each replica: a session's cache is where its last turn ran (affinity is hard).
    #[default]
    Replica,
    /// In a tier every replica of the region reaches (Mooncake, LMCache): the region is what
    /// holds the cache, so inside it the least-loaded replica serves (affinity is soft).
    Region,
}

/// Which branch produced a decision; also the `outcome` label in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The override entry's replica was eligible.
    Sticky,
    /// The override entry's replica was over the shedding limit: the session moved to the
    /// least-loaded eligible replica (see [`crate::ReplicaLoad`]).
    Shed,
    /// The key's ring owner in its home region took it.
    Ring,
    /// The ring owner was over the load bound; a later replica on the walk took it.
    Rebalanced,
    /// A new session went past its ring owner to a replica warm for its tenant (or, when none
    /// is, serving the fewest other tenants): see [`crate::TenantWarmth`].
    Locality,
    /// The session's replica (override or ring owner) was drained, unhealthy or gone.
    Failover,
    /// No replica of the home region could take it; another region did.
    CrossRegion,
    /// The session's region shares its KV cache among its replicas (`kv_scope: region`):
    /// the least-loaded eligible replica of that region took it.
    SharedKv,
    /// The request carried no token.
    #[serde(rename = "none")]
    NoToken,
}

impl Outcome {
    /// Every outcome, in the order of the routing contract.
    pub const ALL: [Outcome; 9] = [
        Outcome::Sticky,
        Outcome::Shed,
        Outcome::Ring,
        Outcome::Rebalanced,
        Outcome::Locality,
        Outcome::Failover,
        Outcome::CrossRegion,
        Outcome::SharedKv,
        Outcome::NoToken,
    ];

    /// Label for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Sticky => "sticky",
            Outcome::Shed => "shed",
            Outcome::Ring => "ring",
            Outcome::Rebalanced => "rebalanced",
            Outcome::Locality => "locality",
            Outcome::Failover => "failover",
            Outcome::CrossRegion => "cross_region",
            Outcome::SharedKv => "shared_kv",
            Outcome::NoToken => "none",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request's session key came from (`affinity.key_sources` lists them in the order
/// they are tried; the usage log and metrics carry the one that won as `key_source`, `none`
/// when none did).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The affinity header (`affinity.header`), addressed to Tether.
    Header,
    /// A session id an agent harness sends of its own (`affinity.agent_headers`).
    AgentHeader,
    /// OpenAI's `prompt_cache_key` body field (Chat Completions and Responses).
    PromptCacheKey,
    /// OpenAI's `user` body field, or Anthropic's `metadata.user_id`: often one id for every
    /// conversation of an end user, so only listed on purpose.
    User,
    /// The keyed hash of the conversation's head (tenant, model, system prompt and first user
    /// message).
    Fingerprint,
}

impl KeySource {
    /// Every source, in the default order of trust.
    pub const ALL: [KeySource; 5] = [
        KeySource::Header,
        KeySource::AgentHeader,
        KeySource::PromptCacheKey,
        KeySource::User,
        KeySource::Fingerprint,
    ];

    /// The label in the topology file, logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            KeySource::Header => "header",
            KeySource::AgentHeader => "agent_header",
            KeySource::PromptCacheKey => "prompt_cache_key",
            KeySource::User => "user",
            KeySource::Fingerprint => "fingerprint",
        }
    }

    /// Whether the key is found in the request body (which must then be read ahead).
    pub const fn reads_body(self) -> bool {
        matches!(
            self,
            KeySource::PromptCacheKey | KeySource::User | KeySource::Fingerprint
        )
    }

    /// The label of an optional source: `none` for a request that had no key.
    pub const fn label(source: Option<KeySource>) -> &'static str {
        match source {
            Some(s) => s.as_str(),
            None => "none",
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label that names no [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{label:?} is not a routing outcome (sticky, shed, ring, rebalanced, locality, failover, cross_region, shared_kv or none)")]
pub struct UnknownOutcome {
    /// The label as given.
    pub label: String,
}

impl FromStr for Outcome {
    type Err = UnknownOutcome;

    /// The outcome whose [`as_str`](Outcome::as_str) label is `label`.
    fn from_str(label: &str) -> Result<Outcome, UnknownOutcome> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == label)
            .ok_or_else(|| UnknownOutcome {
                label: label.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_labels_serde_and_from_str_agree() {
        for outcome in Outcome::ALL {
            let label = outcome.as_str();
            assert_eq!(
                serde_json::to_string(&outcome).unwrap(),
                format!("\"{label}\"")
            );
            assert_eq!(
                serde_json::from_str::<Outcome>(&format!("\"{label}\"")).unwrap(),
                outcome
            );
            assert_eq!(label.parse::<Outcome>(), Ok(outcome));
            assert_eq!(outcome.to_string(), label);
        }
        assert_eq!(Outcome::NoToken.as_str(), "none");
        assert_eq!(Outcome::CrossRegion.as_str(), "cross_region");
    }

    #[test]
    fn unknown_outcome_labels_are_refused() {
        for label in ["", "Sticky", "no_token", "cross-region", "ring "] {
            let err = label.parse::<Outcome>().unwrap_err();
            assert_eq!(err.label, label);
            assert!(serde_json::from_str::<Outcome>(&format!("{label:?}")).is_err());
        }
    }

    #[test]
    fn key_source_labels_serde_and_as_str_agree() {
        for source in KeySource::ALL {
            let label = source.as_str();
            assert_eq!(
                serde_json::to_string(&source).unwrap(),
                format!("\"{label}\"")
            );
            assert_eq!(
                serde_json::from_str::<KeySource>(&format!("\"{label}\"")).unwrap(),
                source
            );
        }
        assert_eq!(KeySource::label(None), "none");
        assert!(serde_json::from_str::<KeySource>("\"none\"").is_err());
    }

    #[test]
    fn admission_names_are_the_topology_spelling() {
        for (admission, name) in [
            (Admission::Active, "active"),
            (Admission::Draining, "draining"),
            (Admission::Disabled, "disabled"),
        ] {
            assert_eq!(admission.as_str(), name);
            assert_eq!(
                serde_json::from_str::<Admission>(&format!("\"{name}\"")).unwrap(),
                admission
            );
            assert_eq!(
                serde_json::to_string(&admission).unwrap(),
                format!("\"{name}\"")
            );
        }
        assert!(serde_json::from_str::<Admission>("\"Active\"").is_err());
        assert_eq!(Admission::default(), Admission::Active);
    }
}
