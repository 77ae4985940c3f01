//! A small map that keeps at most `capacity` entries, dropping the least
//! recently used half when it overflows (amortised O(1) per insert). Used
//! for the descriptors the daemon keeps open, so that their number stays
//! bounded however many inodes the kernel remembers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

struct Entry<V> {
    value: V,
    used: u64,
}

pub struct BoundedCache<V> {
    map: Mutex<HashMap<u64, Entry<V>>>,
    tick: AtomicU64,
    capacity: usize,
}

impl<V: Clone> BoundedCache<V> {
    pub fn new(capacity: usize) -> Self {
        BoundedCache {
            map: Mutex::new(HashMap::new()),
            tick: AtomicU64::new(0),
            capacity: capacity.max(16),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry<V>>> {
        crate::util::lock(&self.map)
    }

    pub fn get(&self, key: u64) -> Option<V> {
        let now = self.tick.fetch_add(1, Ordering::Relaxed);
        self.map().get_mut(&key).map(|entry| {
            entry.used = now;
            entry.value.clone()
        })
    }

    /// Closing a descriptor can wait for the disk (the last one of an
    /// unlinked inode frees its blocks: a discard on some disks), so values
    /// leaving the map are dropped after its lock is released.
    pub fn insert(&self, key: u64, value: V) {
        let now = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut dropped = Vec::new();
        {
            let mut map = self.map();
            dropped.extend(map.insert(key, Entry { value, used: now }));
            if map.len() > self.capacity {
                let mut ticks: Vec<u64> = map.values().map(|e| e.used).collect();
                let mid = ticks.len() / 2;
                let (_, median, _) = ticks.select_nth_unstable(mid);
                let cutoff = *median;
                let old: Vec<u64> = map.iter().filter(|(_, e)| e.used <= cutoff).map(|(k, _)| *k).collect();
                dropped.extend(old.iter().filter_map(|k| map.remove(k)));
            }
        }
        drop(dropped);
    }

    /// Takes `key`'s value out, for the caller to drop outside its own locks.
    #[must_use = "dropping the value is the caller's: outside any lock it holds"]
    pub fn remove(&self, key: u64) -> Option<V> {
        let removed = self.map().remove(&key);
        removed.map(|e| e.value)
    }

    pub fn clear(&self) {
        let all = std::mem::take(&mut *self.map());
        drop(all);
    }
}

#[cfg(test)]
mod tests {
    use super::BoundedCache;

    #[test]
    fn keeps_recently_used_entries_within_capacity() {
        let cache = BoundedCache::new(16);
        for key in 0..16 {
            cache.insert(key, key * 10);
        }
        // Touch the first half so the second half is the least recently used.
        for key in 0..8 {
            assert_eq!(cache.get(key), Some(key * 10));
        }
        cache.insert(100, 1000);
        // The overflow dropped about half, oldest first: all of 8..16 and
        // no more than one of the touched keys.
        assert!(
            (8..16).all(|key| cache.get(key).is_none()),
            "least recently used keys survived"
        );
        let touched = (0..8).filter(|&key| cache.get(key) == Some(key * 10)).count();
        assert!(touched >= 7, "only {touched} of the 8 recently used keys survived");
        assert_eq!(cache.get(100), Some(1000));
        assert!(cache.remove(100).is_some());
        assert_eq!(cache.get(100), None);
        cache.clear();
        assert_eq!(cache.get(0), None);
    }
}
