//! SGLang router's `cache_aware` policy, re-implemented as a client-side baseline: the
//! server-side alternative to session affinity (prefix-aware routing on the request text).
//!
//! What it follows, in the SGLang repository (`sgl-project/sglang`):
//! - `sgl-router/src/policies/cache_aware.rs` (`CacheAwarePolicy::select_worker`): the
//!   decision. The load is *imbalanced* when `max − min > balance_abs_threshold` **and**
//!   `max > min × balance_rel_threshold` (loads = requests in flight per worker); then the
//!   least-loaded worker, and the request text is still inserted under it. Otherwise the
//!   longest prefix match in the tree: when `matched chars / request chars >
//!   cache_threshold` the worker that match names, else the worker with the smallest tree
//!   (most cache room); the text is inserted under the chosen worker.
//! - `sgl-router/src/tree.rs` (later `sgl-router/src/policies/tree.rs`): one approximate radix
//!   tree over *characters* shared by all workers ("tenants"), each node holding the workers
//!   that were sent text through it with a last-access time; `prefix_match` walks to the
//!   deepest node the text reaches (stopping inside a node on a partial match), names the
//!   first worker of that node and refreshes its access times up to the root; per-worker
//!   character counts give the smallest tree; `evict_tenant_by_size` removes the least
//!   recently used leaves of every worker whose count is over `max_tree_size` (run every
//!   `eviction_interval_secs` by a background thread there, inline on the next decision here).
//! - `sgl-router/py_src/sglang_router/router_args.py`: the defaults an operator launching
//!   the router gets (`cache_threshold` 0.3, `balance_abs_threshold` 64,
//!   `balance_rel_threshold` 1.5, `eviction_interval_secs` 120, `max_tree_size` 2^26), used
//!   by [`CacheAwareConfig::default`]. The Rust `CacheAwareConfig::default()` in
//!   `sgl-router/src/policies/mod.rs` differs (0.5, 32, 1.1, 30 s, 10,000):
//!   [`CacheAwareConfig::rust_defaults`].
//! - The request text of a chat completion (`extract_text_for_routing` of
//!   `ChatCompletionRequest` in `sgl-router/src/protocols/spec.rs`): every message's text
//!   joined by a space, an assistant's trimmed and left out when empty ([`routing_text`]).
//!
//! Where it departs, and why: SGLang picks "the first" worker of a node by iterating a
//! `DashMap` (an arbitrary but per-map fixed order); here a `HashMap` with its own random
//! state gives the same kind of arbitrary choice. Ties for the smallest tree go to the lowest
//! worker index (SGLang: the `DashMap` order). The tree is single-threaded behind the
//! caller's lock and walks the text by byte offsets; SGLang's node-level `DashMap`s and the
//! `String` it re-slices at every step cost more, so the CPU measured here is a lower bound
//! of the router's.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

/// The policy's knobs, named as SGLang names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheAwareConfig {
    /// Minimum share of the request's characters the best match must cover to route on it.
    pub cache_threshold: f64,
    /// Imbalanced only if `max − min` in-flight exceeds this…
    pub balance_abs_threshold: usize,
    /// …and `max > min × this`.
    pub balance_rel_threshold: f64,
    /// How often the trees are trimmed.
    pub eviction_interval: Duration,
    /// Characters a worker's tree may hold before its least recently used leaves go.
    pub max_tree_size: usize,
}

impl Default for CacheAwareConfig {
    /// The launcher's defaults (`router_args.py`).
    fn default() -> Self {
        CacheAwareConfig {
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
            eviction_interval: Duration::from_secs(120),
            max_tree_size: 1 << 26,
        }
    }
}

impl CacheAwareConfig {
    /// The Rust library's `CacheAwareConfig::default()` (`policies/mod.rs`).
    pub fn rust_defaults() -> Self {
        CacheAwareConfig {
            cache_threshold: 0.5,
            balance_abs_threshold: 32,
            balance_rel_threshold: 1.1,
            eviction_interval: Duration::from_secs(30),
            max_tree_size: 10_000,
        }
    }
}

/// The text SGLang's router matches for a chat completion, from its messages (role, text):
/// the texts joined by a space, an assistant's trimmed and left out when empty.
pub fn routing_text<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    let mut first = true;
    for (role, text) in messages {
        let text = if role == "assistant" {
            text.trim()
        } else {
            text
        };
        if role == "assistant" && text.is_empty() {
            continue;
        }
        if !first {
            out.push(' ');
        }
        first = false;
        out.push_str(text);
    }
    out
}

/// Which branch a decision took (SGLang records the same as metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheAwareBranch {
    /// Load imbalanced: the least-loaded worker.
    Balance,
    /// Match above the threshold: the worker the match names.
    CacheHit,
    /// Match at or below the threshold: the worker with the smallest tree.
    CacheMiss,
}

type NodeId = usize;
const ROOT: NodeId = 0;

#[derive(Debug, Default)]
struct Node {
    /// Keyed by the first character of the child's text.
    children: HashMap<char, NodeId>,
    text: String,
    /// `text.chars().count()`.
    chars: usize,
    /// Worker → last access, milliseconds since the tree was made.
    workers: HashMap<usize, u64>,
    parent: Option<NodeId>,
}

/// The approximate radix tree of what each worker was sent (SGLang's `Tree`), over
/// characters. Nodes cut off by eviction stay in the arena, unreachable.
#[derive(Debug)]
pub struct ApproxTree {
    nodes: Vec<Node>,
    /// Characters per worker (SGLang's `tenant_char_count`).
    char_count: Vec<usize>,
    epoch: Instant,
}

/// Characters and bytes `a` and `b` share at their start.
fn shared_prefix(a: &str, b: &str) -> (usize, usize) {
    let mut chars = 0;
    let mut bytes = 0;
    for (x, y) in a.chars().zip(b.chars()) {
        if x != y {
            break;
        }
        chars += 1;
        bytes += x.len_utf8();
    }
    (chars, bytes)
}

impl ApproxTree {
    /// An empty tree for `workers` workers (each inserted with the empty text, as SGLang's
    /// `init_workers` does).
    pub fn new(workers: usize) -> Self {
        let mut tree = ApproxTree {
            nodes: vec![Node::default()],
            char_count: vec![0; workers],
            epoch: Instant::now(),
        };
        for w in 0..workers {
            tree.insert("", w);
        }
        tree
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Characters held for each worker.
    pub fn char_count(&self) -> &[usize] {
        &self.char_count
    }

    fn grow(&mut self, worker: usize) {
        if worker >= self.char_count.len() {
            self.char_count.resize(worker + 1, 0);
        }
    }

    /// Records that `worker` was sent `text`.
    pub fn insert(&mut self, text: &str, worker: usize) {
        self.grow(worker);
        let now = self.now_ms();
        self.nodes[ROOT].workers.insert(worker, now);
        let mut current = ROOT;
        let mut at = 0;
        while let Some(first) = text[at..].chars().next() {
            let rest = &text[at..];
            let Some(&child) = self.nodes[current].children.get(&first) else {
                let chars = rest.chars().count();
                self.char_count[worker] += chars;
                let id = self.nodes.len();
                self.nodes.push(Node {
                    children: HashMap::new(),
                    text: rest.to_owned(),
                    chars,
                    workers: HashMap::from([(worker, now)]),
                    parent: Some(current),
                });
                self.nodes[current].children.insert(first, id);
                return;
            };
            let (chars, bytes) = shared_prefix(&self.nodes[child].text, rest);
            let next = if chars < self.nodes[child].chars {
                // Split: current → [shared part, every worker of the child] → [the rest].
                let tail = self.nodes[child].text.split_off(bytes);
                let head = std::mem::replace(&mut self.nodes[child].text, tail);
                let tail_first = self.nodes[child].text.chars().next().unwrap_or(first);
                let id = self.nodes.len();
                self.nodes.push(Node {
                    children: HashMap::from([(tail_first, child)]),
                    text: head,
                    chars,
                    workers: self.nodes[child].workers.clone(),
                    parent: Some(current),
                });
                self.nodes[child].chars -= chars;
                self.nodes[child].parent = Some(id);
                self.nodes[current].children.insert(first, id);
                id
            } else {
                child
            };
            let node = &mut self.nodes[next];
            if node.workers.insert(worker, now).is_none() {
                self.char_count[worker] += node.chars;
            }
            at += bytes;
            current = next;
        }
    }

    /// The characters of `text` the tree holds at its start, and the worker the deepest node
    /// reached names (its access times refreshed up to the root); `None` on an empty tree.
    pub fn prefix_match(&mut self, text: &str) -> (usize, Option<usize>) {
        let mut current = ROOT;
        let mut matched = 0;
        let mut at = 0;
        while let Some(first) = text[at..].chars().next() {
            let Some(&child) = self.nodes[current].children.get(&first) else {
                break;
            };
            let (chars, bytes) = shared_prefix(&self.nodes[child].text, &text[at..]);
            matched += chars;
            at += bytes;
            current = child;
            if chars < self.nodes[child].chars {
                break;
            }
        }
        let worker = self.nodes[current].workers.keys().next().copied();
        if let Some(w) = worker {
            let now = self.now_ms();
            let mut node = Some(current);
            while let Some(id) = node {
                self.nodes[id].workers.insert(w, now);
                node = self.nodes[id].parent;
            }
        }
        (matched, worker)
    }

    /// The worker with the fewest characters (the lowest index among equals).
    pub fn smallest(&self) -> usize {
        (0..self.char_count.len())
            .min_by_key(|&w| self.char_count[w])
            .unwrap_or(0)
    }

    /// Workers of `id` that no child of it holds: the node is a leaf of their trees.
    fn leaf_of(&self, id: NodeId) -> Vec<usize> {
        let node = &self.nodes[id];
        node.workers
            .keys()
            .copied()
            .filter(|w| {
                !node
                    .children
                    .values()
                    .any(|c| self.nodes[*c].workers.contains_key(w))
            })
            .collect()
    }

    /// Removes least recently used leaves of every worker holding more than `max_chars`
    /// characters until it holds at most that (SGLang's `evict_tenant_by_size`).
    pub fn evict_by_size(&mut self, max_chars: usize) {
        let mut queue = BinaryHeap::new();
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            stack.extend(self.nodes[id].children.values().copied());
            for w in self.leaf_of(id) {
                if let Some(&t) = self.nodes[id].workers.get(&w) {
                    queue.push(Reverse((t, w, id)));
                }
            }
        }
        while let Some(Reverse((_, worker, id))) = queue.pop() {
            if self.char_count.get(worker).is_some_and(|&n| n <= max_chars) {
                continue;
            }
            if self.nodes[id].workers.remove(&worker).is_some() {
                self.char_count[worker] =
                    self.char_count[worker].saturating_sub(self.nodes[id].chars);
            }
            let parent = self.nodes[id].parent;
            if let Some(p) = parent {
                let node = &self.nodes[id];
                if node.children.is_empty() && node.workers.is_empty() {
                    if let Some(first) = node.text.chars().next() {
                        self.nodes[p].children.remove(&first);
                    }
                }
                if self.leaf_of(p).contains(&worker) {
                    if let Some(&t) = self.nodes[p].workers.get(&worker) {
                        queue.push(Reverse((t, worker, p)));
                    }
                }
            }
        }
    }
}

/// SGLang's cache-aware decision over an [`ApproxTree`].
#[derive(Debug)]
pub struct CacheAwareRouter {
    config: CacheAwareConfig,
    tree: ApproxTree,
    last_eviction: Instant,
}

impl CacheAwareRouter {
    /// A router over `workers` workers.
    pub fn new(workers: usize, config: CacheAwareConfig) -> Self {
        CacheAwareRouter {
            config,
            tree: ApproxTree::new(workers),
            last_eviction: Instant::now(),
        }
    }

    /// The tree (for inspection).
    pub fn tree(&self) -> &ApproxTree {
        &self.tree
    }

    /// The worker for a request of `text`, given each worker's requests in flight, and the
    /// branch taken; the text is recorded under the worker chosen.
    pub fn select(&mut self, text: &str, loads: &[usize]) -> (usize, CacheAwareBranch) {
        if self.last_eviction.elapsed() >= self.config.eviction_interval {
            self.tree.evict_by_size(self.config.max_tree_size);
            self.last_eviction = Instant::now();
        }
        let max = loads.iter().copied().max().unwrap_or(0);
        let min = loads.iter().copied().min().unwrap_or(0);
        let imbalanced = max.saturating_sub(min) > self.config.balance_abs_threshold
            && max as f64 > min as f64 * self.config.balance_rel_threshold;
        if imbalanced {
            let least = (0..loads.len()).min_by_key(|&i| loads[i]).unwrap_or(0);
            self.tree.insert(text, least);
            return (least, CacheAwareBranch::Balance);
        }
        let (matched, worker) = self.tree.prefix_match(text);
        let chars = text.chars().count();
        let rate = if chars == 0 {
            0.0
        } else {
            matched as f64 / chars as f64
        };
        let (chosen, branch) = match worker {
            Some(w) if rate > self.config.cache_threshold => (w, CacheAwareBranch::CacheHit),
            _ => (self.tree.smallest(), CacheAwareBranch::CacheMiss),
        };
        self.tree.insert(text, chosen);
        (chosen, branch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Characters per worker, recomputed from the nodes reachable from the root.
    fn recount(tree: &ApproxTree) -> Vec<usize> {
        let mut counts = vec![0; tree.char_count.len()];
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            stack.extend(tree.nodes[id].children.values().copied());
            for w in tree.nodes[id].workers.keys() {
                counts[*w] += tree.nodes[id].chars;
            }
        }
        counts
    }

    #[test]
    fn matches_walk_into_split_nodes_and_counts_stay_exact() {
        let mut tree = ApproxTree::new(2);
        for (text, w) in [
            ("apple", 0),
            ("apricot", 0),
            ("banana", 0),
            ("amplify", 1),
            ("application", 1),
            ("zebra", 0),
            ("zebra", 1),
        ] {
            tree.insert(text, w);
        }
        assert_eq!(tree.char_count(), recount(&tree).as_slice());
        assert_eq!(tree.prefix_match("banana split"), (6, Some(0)));
        // "appl" is shared by both workers; the match stops inside worker 1's "ication".
        assert_eq!(tree.prefix_match("applicable"), (7, Some(1)));
        assert_eq!(tree.prefix_match("xylophone").0, 0);
        // Non-ASCII text is matched by characters.
        tree.insert("héllo wörld", 1);
        assert_eq!(tree.prefix_match("héllo"), (5, Some(1)));
        assert_eq!(tree.char_count(), recount(&tree).as_slice());
    }

    #[test]
    fn eviction_drops_least_recent_leaves_down_to_the_limit() {
        let mut tree = ApproxTree::new(2);
        tree.insert("old conversation", 0);
        std::thread::sleep(Duration::from_millis(3));
        tree.insert("new conversation", 0);
        tree.insert("other", 1);
        tree.evict_by_size(16);
        assert_eq!(tree.char_count(), recount(&tree).as_slice());
        assert_eq!(tree.char_count()[0], 16);
        assert_eq!(tree.prefix_match("new conversation").0, 16);
        // Only the "o" worker 1's "other" shares is left of it, and it is worker 1's alone.
        assert_eq!(tree.prefix_match("old conversation"), (1, Some(1)));
        assert_eq!(tree.prefix_match("other"), (5, Some(1)));
    }

    #[test]
    fn decisions_follow_the_match_the_threshold_and_the_load() {
        let mut router = CacheAwareRouter::new(3, CacheAwareConfig::default());
        let idle = [0, 0, 0];
        // Cold: the smallest tree (all empty: the first).
        let (first, branch) = router.select("system prompt. user one", &idle);
        assert_eq!((first, branch), (0, CacheAwareBranch::CacheMiss));
        // An unrelated conversation goes to a worker with room.
        let (second, _) = router.select("another head entirely", &idle);
        assert_ne!(second, first);
        // The next turn of the first conversation matches it above the threshold.
        let (next, branch) = router.select("system prompt. user one reply two", &idle);
        assert_eq!((next, branch), (first, CacheAwareBranch::CacheHit));
        // Imbalanced (70 − 0 > 64 and 70 > 0 × 1.5): the least loaded, whatever the match.
        let (least, branch) = router.select("system prompt. user one reply two", &[70, 5, 0]);
        assert_eq!((least, branch), (2, CacheAwareBranch::Balance));
        let messages = [
            ("system", "sys"),
            ("user", "hi "),
            ("assistant", " hello "),
            ("assistant", ""),
            ("user", "bye"),
        ];
        assert_eq!(routing_text(messages), "sys hi  hello bye");
    }
}
