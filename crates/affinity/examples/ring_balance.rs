//! Measures the balance and the disruption of the ring choices behind `docs/architecture.md`.
//!
//! `cargo run --release -p tether-affinity --example ring_balance`
//!
//! For ketama at several points-per-weight and for Maglev (table size 65,537), over many random
//! fleets: the worst replica's share relative to its fair share (max/mean and the largest
//! relative deviation), and the share of keys that move when a replica is added (ideal:
//! 1/(N+1)), and how many of those land on a replica other than the new one (ideal: 0).

use tether_affinity::Ring;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

const KEYS: u64 = 200_000;

fn key_position(k: u64) -> u32 {
    (xxh3_64(&k.to_le_bytes()) >> 32) as u32
}

fn ketama(ids: &[String], points: u32) -> Vec<u32> {
    let ring = Ring::new(
        ids.iter()
            .enumerate()
            .map(|(i, id)| (i as u32, id.as_str(), 1)),
        points,
    );
    (0..KEYS)
        .map(|k| ring.owner(key_position(k)).unwrap_or(0))
        .collect()
}

/// Maglev lookup table (Eisenbud et al. 2016), equal weights.
fn maglev(ids: &[String], m: usize) -> Vec<u32> {
    let n = ids.len();
    let perms: Vec<(usize, usize)> = ids
        .iter()
        .map(|id| {
            let offset = (xxh3_64_with_seed(id.as_bytes(), 1) % m as u64) as usize;
            let skip = (xxh3_64_with_seed(id.as_bytes(), 2) % (m as u64 - 1) + 1) as usize;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    (0..KEYS)
        .map(|k| table[(xxh3_64(&k.to_le_bytes()) % m as u64) as usize])
        .collect()
}

struct Stats {
    max_over_mean: f64,
    worst_dev: f64,
    moved: f64,
    moved_elsewhere: f64,
}

fn measure(assign: &dyn Fn(&[String]) -> Vec<u32>, n: usize, trials: u64) -> Stats {
    let mut s = Stats {
        max_over_mean: 0.0,
        worst_dev: 0.0,
        moved: 0.0,
        moved_elsewhere: 0.0,
    };
    for t in 0..trials {
        let ids: Vec<String> = (0..n).map(|i| format!("replica-{t}-{i}")).collect();
        let before = assign(&ids);
        let mut counts = vec![0u64; n];
        for r in &before {
            counts[*r as usize] += 1;
        }
        let mean = KEYS as f64 / n as f64;
        let max = *counts.iter().max().unwrap_or(&0) as f64;
        s.max_over_mean = s.max_over_mean.max(max / mean);
        for c in &counts {
            s.worst_dev = s.worst_dev.max((*c as f64 / mean - 1.0).abs());
        }
        let mut grown = ids.clone();
        grown.push(format!("replica-{t}-new"));
        let after = assign(&grown);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let elsewhere = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b && **b != n as u32)
            .count();
        s.moved += moved as f64 / KEYS as f64 / trials as f64;
        s.moved_elsewhere += elsewhere as f64 / KEYS as f64 / trials as f64;
    }
    s
}

fn main() {
    let trials = 20;
    println!("| ring | N | worst max/mean | worst |share/fair − 1| | moved on add (ideal 1/(N+1)) | moved to an old replica |");
    println!("|---|---|---|---|---|---|");
    for n in [6usize, 20] {
        for points in [160u32, 256, 512, 1024, 2048] {
            let s = measure(&|ids| ketama(ids, points), n, trials);
            println!(
                "| ketama {points} pts/weight | {n} | {:.3} | {:.1} % | {:.4} ({:.4}) | {:.4} |",
                s.max_over_mean,
                s.worst_dev * 100.0,
                s.moved,
                1.0 / (n as f64 + 1.0),
                s.moved_elsewhere
            );
        }
        let s = measure(&|ids| maglev(ids, 65_537), n, trials);
        println!(
            "| maglev M=65537 | {n} | {:.3} | {:.1} % | {:.4} ({:.4}) | {:.4} |",
            s.max_over_mean,
            s.worst_dev * 100.0,
            s.moved,
            1.0 / (n as f64 + 1.0),
            s.moved_elsewhere
        );
    }
}
