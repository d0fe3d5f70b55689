//! Flush statistics and latency distributions.

use hdrhistogram::Histogram;
use std::time::Duration;

/// A latency distribution in microseconds, from 1 µs to one hour at three
/// significant digits; mergeable across vbuckets.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    histogram: Histogram<u64>,
}

/// Longest latency recorded exactly; longer ones are clamped.
const MAX_MICROS: u64 = 3_600_000_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty distribution.
    pub fn new() -> Self {
        // The bounds are constants that hdrhistogram accepts (low >= 1,
        // high >= 2 * low, 3 significant figures), so this cannot fail.
        #[allow(clippy::expect_used)]
        let histogram = Histogram::new_with_bounds(1, MAX_MICROS, 3)
            .expect("constant histogram bounds are valid");
        Self { histogram }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_MICROS);
        self.histogram
            .saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Both have the same bounds, so adding cannot fail; saturate anyway.
        if self.histogram.add(&other.histogram).is_err() {
            for v in other.histogram.iter_recorded() {
                self.histogram
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at `quantile` (0.0 to 1.0); zero when empty.
    pub fn quantile(&self, quantile: f64) -> Duration {
        if self.histogram.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_micros(self.histogram.value_at_quantile(quantile))
    }

    /// Count, p50, p99, p99.9, mean and maximum.
    pub fn summary(&self) -> LatencySummary {
        let empty = self.histogram.is_empty();
        LatencySummary {
            count: self.count(),
            p50: self.quantile(0.5),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            mean: if empty {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(self.histogram.mean() / 1e6)
            },
            max: if empty {
                Duration::ZERO
            } else {
                Duration::from_micros(self.histogram.max())
            },
        }
    }
}

/// Percentiles of a [`LatencyHistogram`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Mean.
    pub mean: Duration,
    /// Maximum.
    pub max: Duration,
}

/// What the flusher did for one vbucket (or, merged, for all of them).
#[derive(Debug, Clone, Default)]
pub struct FlushStats {
    /// Items written (after dedup).
    pub items_flushed: u64,
    /// Queued mutations dedup dropped because a newer one of the same key
    /// was in the same batch.
    pub items_deduplicated: u64,
    /// Batches committed.
    pub batches_flushed: u64,
    /// Bytes the commits appended.
    pub bytes_written: u64,
    /// Commits that failed.
    pub commit_failures: u64,
    /// Commits retried after a failure.
    pub retries: u64,
    /// Batches dropped after a failure that retrying cannot fix (their
    /// waiters got [`crate::Error::CommitFailed`]).
    pub batches_dropped: u64,
    /// The last commit error, if any commit failed.
    pub last_error: Option<String>,
    /// Latency of successful commits.
    pub commit_latency: LatencyHistogram,
    /// Items queued and not yet persisted.
    pub queued_items: u64,
    /// Bytes queued and not yet persisted.
    pub queued_bytes: u64,
    /// Age of the oldest item not yet persisted (to about a millisecond).
    pub oldest_queued_age: Duration,
    /// Highest seqno enqueued.
    pub high_seqno: u64,
    /// Highest seqno decided: persisted, or (rarely) in a batch dropped
    /// after a permanent failure.
    pub persisted_seqno: u64,
}

impl FlushStats {
    /// Adds `other`'s counters and samples to these (seqnos: the maximum;
    /// ages: the oldest; last error: `other`'s if it has one).
    pub fn merge(&mut self, other: &FlushStats) {
        self.items_flushed += other.items_flushed;
        self.items_deduplicated += other.items_deduplicated;
        self.batches_flushed += other.batches_flushed;
        self.bytes_written += other.bytes_written;
        self.commit_failures += other.commit_failures;
        self.retries += other.retries;
        self.batches_dropped += other.batches_dropped;
        if other.last_error.is_some() {
            self.last_error.clone_from(&other.last_error);
        }
        self.commit_latency.merge(&other.commit_latency);
        self.queued_items += other.queued_items;
        self.queued_bytes += other.queued_bytes;
        self.oldest_queued_age = self.oldest_queued_age.max(other.oldest_queued_age);
        self.high_seqno = self.high_seqno.max(other.high_seqno);
        self.persisted_seqno = self.persisted_seqno.max(other.persisted_seqno);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = LatencyHistogram::new();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        let near = |d: Duration, ms: u64| d.as_micros().abs_diff(u128::from(ms) * 1000) <= 100;
        assert!(near(s.p50, 50), "{s:?}");
        assert!(near(s.p99, 99), "{s:?}");
        assert!(near(s.max, 100), "{s:?}");
        let mut other = LatencyHistogram::new();
        other.record(Duration::from_secs(5));
        h.merge(&other);
        assert_eq!(h.count(), 101);
        assert!(h.summary().max >= Duration::from_millis(4990));
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(LatencyHistogram::new().summary(), LatencySummary::default());
    }
}
