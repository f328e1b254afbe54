//! Per-key ordering on brokers that order only within a queue: a message's key (its
//! `subject`) picks one of a fixed number of partitions, and each partition is consumed one
//! message at a time. Publishers and consumers in different processes (and builds) must agree
//! on the partition of a key, so the hash is a fixed, documented one (FNV-1a, 64 bits), not
//! the standard library's randomly seeded one.

/// Partitions per subscription unless the broker URL says otherwise (`?partitions=N`). It is
/// the most messages of one subscription in flight at once; keep it the same for every
/// process that shares the broker.
pub const DEFAULT_PARTITIONS: u16 = 32;

/// The partition of `key` among `partitions` (which must be at least 1).
pub fn of(key: &str, partitions: u16) -> u16 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let h = key
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (h % u64::from(partitions.max(1))) as u16
}

#[cfg(test)]
mod tests {
    #[test]
    fn stable_and_spread() {
        // Fixed values: a change here would split one key's messages across partitions
        // between old and new processes.
        assert_eq!(super::of("", 32), (0xcbf2_9ce4_8422_2325u64 % 32) as u16);
        assert_eq!(super::of("order-1", 1), 0);
        let mut seen = [0u32; 8];
        for i in 0..8000 {
            seen[super::of(&format!("order-{i}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
