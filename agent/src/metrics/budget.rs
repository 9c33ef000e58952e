//! The cardinality budget: how many series one metric may have in one group (a network
//! namespace) before new label sets are folded into `other`. Budgets are per namespace so that
//! one noisy container cannot use up the labels of the others. A label set is decided the first time it is seen and never again, so
//! a counter never moves from one series to another and never decreases.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::atomic::{AtomicUsize, Ordering},
};

/// The configurable limits of every budget (`--limit.*`), shared with the collectors and
/// changed in place when the configuration is reloaded. A new limit applies to label sets
/// not seen yet; a decision already taken stands.
#[derive(Debug)]
pub struct Limits {
    series_per_metric: AtomicUsize,
}

impl Limits {
    /// `--limit.series-per-metric`.
    pub fn new(series_per_metric: usize) -> Self {
        Self {
            series_per_metric: AtomicUsize::new(series_per_metric),
        }
    }

    /// Series with their own port label per metric and network namespace.
    pub fn series_per_metric(&self) -> usize {
        self.series_per_metric.load(Ordering::Relaxed)
    }

    /// Changes `--limit.series-per-metric`.
    pub fn set_series_per_metric(&self, limit: usize) {
        self.series_per_metric.store(limit, Ordering::Relaxed);
    }
}

/// Decisions for one metric.
#[derive(Debug)]
pub struct Budget<K> {
    limit: usize,
    admitted: HashMap<u64, usize>,
    decided: HashMap<K, K>,
    folded: u64,
}

impl<K: Copy + Eq + Hash> Budget<K> {
    /// A budget of `limit` series with their own label values.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            admitted: HashMap::new(),
            decided: HashMap::new(),
            folded: 0,
        }
    }

    /// The key to report `raw` under: itself while the budget lasts, else `fold(raw)`.
    /// Keys that are already folded (`fold(raw) == raw`) cost nothing: they are bounded by
    /// construction. `on_fold` runs once for each label set folded.
    pub fn decide(
        &mut self,
        raw: K,
        group: u64,
        fold: impl Fn(K) -> K,
        on_fold: impl FnOnce(),
    ) -> K {
        if let Some(decided) = self.decided.get(&raw) {
            return *decided;
        }
        let folded = fold(raw);
        let decided = if folded == raw {
            raw
        } else if self.admitted.get(&group).copied().unwrap_or(0) < self.limit {
            *self.admitted.entry(group).or_insert(0) += 1;
            raw
        } else {
            self.folded += 1;
            on_fold();
            folded
        };
        self.decided.insert(raw, decided);
        decided
    }

    /// How many label sets were folded so far.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// Changes the limit; decisions already taken stand.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(k: (u32, u16)) -> (u32, u16) {
        (k.0, 0)
    }

    impl Budget<(u32, u16)> {
        fn decide_in(
            &mut self,
            k: (u32, u16),
            fold: fn((u32, u16)) -> (u32, u16),
            _: fn(),
        ) -> (u32, u16) {
            self.decide(k, u64::from(k.0), fold, || ())
        }
    }

    #[test]
    fn each_group_has_its_own_budget() {
        let mut b = Budget::new(1);
        assert_eq!(b.decide_in((1, 80), fold, || ()), (1, 80));
        assert_eq!(b.decide_in((1, 81), fold, || ()), (1, 0));
        assert_eq!(b.decide_in((2, 81), fold, || ()), (2, 81));
    }

    #[test]
    fn admits_up_to_the_limit_then_folds() {
        let mut b = Budget::new(2);
        assert_eq!(b.decide_in((1, 80), fold, || ()), (1, 80));
        assert_eq!(b.decide_in((1, 443), fold, || ()), (1, 443));
        assert_eq!(b.decide_in((1, 8080), fold, || ()), (1, 0));
        assert_eq!(b.folded(), 1);
        // Already-folded keys are free and never counted as folded.
        assert_eq!(b.decide_in((2, 0), fold, || ()), (2, 0));
        assert_eq!(b.folded(), 1);
    }

    #[test]
    fn decisions_never_change() {
        let mut b = Budget::new(1);
        assert_eq!(b.decide_in((1, 80), fold, || ()), (1, 80));
        assert_eq!(b.decide_in((1, 81), fold, || ()), (1, 0));
        b.set_limit(10);
        assert_eq!(
            b.decide_in((1, 81), fold, || ()),
            (1, 0),
            "a folded key stays folded"
        );
        assert_eq!(b.decide_in((1, 82), fold, || ()), (1, 82));
        b.set_limit(0);
        assert_eq!(
            b.decide_in((1, 80), fold, || ()),
            (1, 80),
            "an admitted key stays admitted"
        );
    }
}
