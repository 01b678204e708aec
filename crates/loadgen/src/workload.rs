//! The workload: what sessions say, decided by a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// How a client names its conversation, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientProfile {
    /// The affinity header (`x-session-affinity`).
    Header,
    /// An agent's own session header (`x-claude-code-session-id`).
    AgentHeader,
    /// OpenAI's `prompt_cache_key` body field.
    PromptCacheKey,
    /// Nothing: only the conversation itself (the proxy's fingerprint, if on).
    Nothing,
}

impl ClientProfile {
    /// Every profile.
    pub const ALL: [ClientProfile; 4] = [
        ClientProfile::Header,
        ClientProfile::AgentHeader,
        ClientProfile::PromptCacheKey,
        ClientProfile::Nothing,
    ];

    /// The name in reports and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            ClientProfile::Header => "header",
            ClientProfile::AgentHeader => "agent_header",
            ClientProfile::PromptCacheKey => "prompt_cache_key",
            ClientProfile::Nothing => "nothing",
        }
    }
}

impl std::str::FromStr for ClientProfile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        ClientProfile::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is not a client profile (header, agent_header, prompt_cache_key, nothing)")
            })
    }
}

/// The system prompt of the sessions that share one head.
pub const SHARED_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// The shape of the traffic.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Sessions to run.
    pub sessions: usize,
    /// Turns per session.
    pub turns: usize,
    /// Sessions in progress at once.
    pub concurrency: usize,
    /// New sessions per second (at most; `0` = all at once up to `concurrency`).
    pub arrival_rate: f64,
    /// Upper bound of the uniform think time between turns, milliseconds.
    pub think_ms: u64,
    /// Tenants; session `i` belongs to tenant `i % tenants`.
    pub tenants: usize,
    /// Tokens of each tenant's shared system prompt.
    pub system_tokens: usize,
    /// Tokens of each new user message.
    pub user_tokens: usize,
    /// `max_tokens` of each request (the reply length).
    pub max_tokens: u64,
    /// Share of sessions that send no affinity header, 0..=1.
    pub tokenless_fraction: f64,
    /// Share of sessions, 0..=1, that open with the same head: the system prompt
    /// [`SHARED_SYSTEM_PROMPT`] and the first message "hi" (what many chat front ends send),
    /// so their conversation fingerprints collide.
    pub shared_head_fraction: f64,
    /// How the sessions that do name themselves do it: session `i` uses
    /// `profiles[i % profiles.len()]` (`Nothing` sends no id either). Empty = `[Header]`.
    pub profiles: Vec<ClientProfile>,
    /// Seed of every random choice.
    pub seed: u64,
    /// Model name sent.
    pub model: String,
    /// A hot spot: tenant 0's sessions run this many times `turns` (1 = none).
    pub hot_tenant_factor: usize,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            sessions: 48,
            turns: 8,
            concurrency: 16,
            arrival_rate: 8.0,
            think_ms: 200,
            tenants: 2,
            system_tokens: 1024,
            user_tokens: 128,
            max_tokens: 64,
            tokenless_fraction: 0.0,
            profiles: vec![ClientProfile::Header],
            shared_head_fraction: 0.0,
            seed: 42,
            model: "tether-sim".into(),
            hot_tenant_factor: 1,
        }
    }
}

/// `tokens` tokens of pseudo-text (4-byte words, matching the simulator's tokenizer).
pub fn text(rng: &mut StdRng, tokens: usize) -> String {
    let mut out = String::with_capacity(tokens * 4);
    for _ in 0..tokens {
        for _ in 0..3 {
            out.push(char::from(b'a' + rng.gen_range(0..26u8)));
        }
        out.push(' ');
    }
    out
}

/// One session's script.
#[derive(Debug, Clone)]
pub struct SessionPlan {
    /// Index of the session.
    pub index: usize,
    /// Its tenant.
    pub tenant: usize,
    /// Its affinity token (a UUIDv4), if it sends one.
    pub token: Option<String>,
    /// How it sends it (`Nothing` when it sends none).
    pub profile: ClientProfile,
    /// It opens with the shared head (system prompt [`SHARED_SYSTEM_PROMPT`], first message
    /// "hi").
    pub shared_head: bool,
    /// The user message of each turn.
    pub user_messages: Vec<String>,
    /// Think time before each turn after the first, milliseconds.
    pub think_ms: Vec<u64>,
}

impl Workload {
    /// The system prompt of `tenant` (shared by all its sessions).
    pub fn system_prompt(&self, tenant: usize) -> String {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5157_0000 ^ tenant as u64);
        format!(
            "You are agent #{tenant}. {}",
            text(&mut rng, self.system_tokens)
        )
    }

    /// The system prompt `plan`'s session sends.
    pub fn system_prompt_of(&self, plan: &SessionPlan) -> String {
        if plan.shared_head {
            SHARED_SYSTEM_PROMPT.to_owned()
        } else {
            self.system_prompt(plan.tenant)
        }
    }

    /// Turns of a session of `tenant`.
    pub fn turns_of(&self, tenant: usize) -> usize {
        if tenant == 0 {
            self.turns * self.hot_tenant_factor.max(1)
        } else {
            self.turns
        }
    }

    /// Turns of every session together (requests sent when none fails).
    pub fn total_turns(&self) -> usize {
        (0..self.sessions)
            .map(|i| self.turns_of(i % self.tenants.max(1)))
            .sum()
    }

    /// Session `index`'s script.
    pub fn plan(&self, index: usize) -> SessionPlan {
        let mut rng =
            StdRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index as u64);
        // Draw the token whether or not it is sent, so a session says the same thing with and
        // without the header (policy comparisons then see identical conversations).
        let sends_token = rng.gen::<f64>() >= self.tokenless_fraction;
        let uuid = uuid::Builder::from_random_bytes(rng.gen())
            .into_uuid()
            .to_string();
        let profile = match self.profiles.len() {
            _ if !sends_token => ClientProfile::Nothing,
            0 => ClientProfile::Header,
            n => self.profiles[index % n],
        };
        let token = (profile != ClientProfile::Nothing).then_some(uuid);
        let tenant = index % self.tenants.max(1);
        let turns = self.turns_of(tenant);
        // Drawn from a stream of its own, so the other choices stay what they were.
        let shared_head = self.shared_head_fraction > 0.0
            && StdRng::seed_from_u64(self.seed ^ 0x4845_4144_0000 ^ index as u64).gen::<f64>()
                < self.shared_head_fraction;
        let mut plan = SessionPlan {
            index,
            tenant,
            token,
            profile,
            shared_head,
            user_messages: (0..turns)
                .map(|t| format!("Step {t}: {}", text(&mut rng, self.user_tokens)))
                .collect(),
            think_ms: (0..turns)
                .map(|_| {
                    if self.think_ms == 0 {
                        0
                    } else {
                        rng.gen_range(0..=self.think_ms)
                    }
                })
                .collect(),
        };
        if let (true, Some(first)) = (shared_head, plan.user_messages.first_mut()) {
            *first = "hi".to_owned();
        }
        plan
    }

    /// The request body of a turn, given the conversation so far.
    pub fn request(&self, messages: &[Value], stream: bool) -> Value {
        let mut body =
            json!({"model": self.model, "messages": messages, "max_tokens": self.max_tokens});
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_tenants_sessions_are_longer() {
        let w = Workload {
            hot_tenant_factor: 10,
            sessions: 4,
            tenants: 2,
            ..Workload::default()
        };
        assert_eq!(w.plan(0).user_messages.len(), 80);
        assert_eq!(w.plan(1).user_messages.len(), 8);
        assert_eq!(w.plan(2).think_ms.len(), 80);
        assert_eq!(w.total_turns(), 80 + 8 + 80 + 8);
        // The other tenant's sessions say exactly what they say without a hot spot.
        assert_eq!(
            w.plan(1).user_messages,
            Workload::default().plan(1).user_messages
        );
    }

    #[test]
    fn plans_are_reproducible_from_the_seed() {
        let w = Workload::default();
        let (a, b) = (w.plan(3), w.plan(3));
        assert_eq!(a.token, b.token);
        assert_eq!(a.user_messages, b.user_messages);
        assert_ne!(w.plan(4).token, a.token);
    }

    #[test]
    fn a_session_says_the_same_with_or_without_a_token() {
        let with = Workload::default().plan(5);
        let without = Workload {
            tokenless_fraction: 1.0,
            ..Workload::default()
        }
        .plan(5);
        assert!(with.token.is_some() && without.token.is_none());
        assert_eq!(with.user_messages, without.user_messages);
        assert_eq!(with.think_ms, without.think_ms);
    }

    #[test]
    fn tokens_are_uuid_v4() {
        let token = Workload::default().plan(0).token.unwrap();
        let uuid = uuid::Uuid::parse_str(&token).unwrap();
        assert_eq!(uuid.get_version_num(), 4);
    }

    #[test]
    fn profiles_are_dealt_in_turn_and_nothing_sends_no_token() {
        let w = Workload {
            profiles: vec![ClientProfile::AgentHeader, ClientProfile::Nothing],
            ..Workload::default()
        };
        assert_eq!(w.plan(0).profile, ClientProfile::AgentHeader);
        assert!(w.plan(0).token.is_some());
        assert_eq!(w.plan(1).profile, ClientProfile::Nothing);
        assert!(w.plan(1).token.is_none());
        assert_eq!(Workload::default().plan(3).profile, ClientProfile::Header);
        for p in ClientProfile::ALL {
            assert_eq!(p.as_str().parse::<ClientProfile>(), Ok(p));
        }
    }

    #[test]
    fn shared_heads_open_alike_and_leave_the_other_choices_alone() {
        let plain = Workload::default();
        let shared = Workload {
            shared_head_fraction: 0.3,
            ..Workload::default()
        };
        let n = (0..1000).filter(|i| shared.plan(*i).shared_head).count();
        assert!((240..360).contains(&n), "{n}");
        for i in 0..50 {
            let (a, b) = (plain.plan(i), shared.plan(i));
            assert_eq!(a.token, b.token);
            assert_eq!(a.user_messages[1..], b.user_messages[1..]);
            if b.shared_head {
                assert_eq!(b.user_messages[0], "hi");
                assert_eq!(shared.system_prompt_of(&b), SHARED_SYSTEM_PROMPT);
            } else {
                assert_eq!(a.user_messages, b.user_messages);
            }
        }
    }

    #[test]
    fn tokenless_fraction_is_honoured() {
        let w = Workload {
            tokenless_fraction: 0.25,
            turns: 1,
            user_tokens: 1,
            ..Workload::default()
        };
        let tokenless = (0..4000).filter(|i| w.plan(*i).token.is_none()).count();
        assert!((800..1200).contains(&tokenless), "{tokenless}");
        let all = Workload {
            tokenless_fraction: 1.0,
            ..Workload::default()
        };
        assert!((0..100).all(|i| all.plan(i).token.is_none()));
    }

    #[test]
    fn text_has_the_requested_token_count() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(text(&mut rng, 100).len(), 400);
    }

    #[test]
    fn tenants_share_a_system_prompt_and_differ_from_each_other() {
        let w = Workload::default();
        assert_eq!(w.system_prompt(0), w.system_prompt(0));
        assert_ne!(w.system_prompt(0), w.system_prompt(1));
        assert_eq!(w.plan(2).tenant, 0);
        assert_eq!(w.plan(3).tenant, 1);
    }
}
