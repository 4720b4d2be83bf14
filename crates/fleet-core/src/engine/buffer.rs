//! The bounded buffer between the checks and the writer.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Results waiting to be written. Past `capacity` results, or `max_bytes` of them by their
/// estimated size, the oldest are dropped and counted, so a long store outage (or a fleet of
/// servers answering with large errors) costs memory only up to the bound, and never silently.
#[derive(Debug)]
pub(crate) struct ResultBuffer<T> {
    queue: Mutex<VecDeque<T>>,
    capacity: usize,
    max_bytes: usize,
    /// Estimated bytes queued (not those taken by the writer).
    bytes: AtomicUsize,
    size_of: fn(&T) -> usize,
    /// Results taken by the writer and not yet confirmed written.
    in_write: AtomicUsize,
    dropped: AtomicU64,
    /// Woken when the queue reaches `flush_at`, or when a cycle ends and wants its results
    /// written now.
    pub(crate) full_enough: Notify,
    /// Woken after every write attempt.
    pub(crate) wrote: Notify,
    flush_at: usize,
}

impl<T> ResultBuffer<T> {
    #[cfg(test)]
    pub(crate) fn new(capacity: usize, flush_at: usize) -> Self {
        Self::bounded(capacity, usize::MAX, flush_at, |_| 1)
    }

    /// A buffer of at most `capacity` results and `max_bytes` of them as `size_of` counts.
    pub(crate) fn bounded(
        capacity: usize,
        max_bytes: usize,
        flush_at: usize,
        size_of: fn(&T) -> usize,
    ) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity,
            max_bytes,
            bytes: AtomicUsize::new(0),
            size_of,
            in_write: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            full_enough: Notify::new(),
            wrote: Notify::new(),
            flush_at: flush_at.min(capacity),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the oldest until the queue is within both bounds; the lock is held.
    fn shed(&self, q: &mut VecDeque<T>) {
        while q.len() > self.capacity
            || (q.len() > 1 && self.bytes.load(Ordering::Relaxed) > self.max_bytes)
        {
            let Some(old) = q.pop_front() else { break };
            self.bytes
                .fetch_sub((self.size_of)(&old), Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn push(&self, item: T) {
        let len = {
            let mut q = self.queue();
            self.bytes
                .fetch_add((self.size_of)(&item), Ordering::Relaxed);
            q.push_back(item);
            self.shed(&mut q);
            q.len()
        };
        if len >= self.flush_at {
            self.full_enough.notify_one();
        }
    }

    /// Takes up to `max` of the oldest results for writing.
    pub(crate) fn take(&self, max: usize) -> Vec<T> {
        let mut q = self.queue();
        let n = q.len().min(max);
        self.in_write.fetch_add(n, Ordering::Relaxed);
        let taken: Vec<T> = q.drain(..n).collect();
        let bytes: usize = taken.iter().map(self.size_of).sum();
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        taken
    }

    /// The writer wrote `n` results it had taken.
    pub(crate) fn written(&self, n: usize) {
        self.in_write.fetch_sub(n, Ordering::Relaxed);
    }

    /// The writer could not write `batch`: it goes back in front, oldest first, and the
    /// oldest overall are dropped if that overfills the buffer.
    pub(crate) fn restore(&self, batch: Vec<T>) {
        let n = batch.len();
        let mut q = self.queue();
        for item in batch.into_iter().rev() {
            self.bytes
                .fetch_add((self.size_of)(&item), Ordering::Relaxed);
            q.push_front(item);
        }
        self.in_write.fetch_sub(n, Ordering::Relaxed);
        self.shed(&mut q);
    }

    pub(crate) fn len(&self) -> usize {
        self.queue().len()
    }

    /// Results not yet written: queued plus taken by the writer.
    pub(crate) fn pending(&self) -> u64 {
        (self.len() + self.in_write.load(Ordering::Relaxed)) as u64
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn add_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }
}

impl<T: Send> super::stats::BufferCounts for ResultBuffer<T> {
    fn pending(&self) -> u64 {
        ResultBuffer::pending(self)
    }

    fn dropped(&self) -> u64 {
        ResultBuffer::dropped(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_drops_the_oldest_and_counts() {
        let b = ResultBuffer::new(3, 10);
        for i in 0..5 {
            b.push(i);
        }
        assert_eq!(b.dropped(), 2);
        assert_eq!(b.take(10), vec![2, 3, 4]);
    }

    #[test]
    fn a_failed_batch_goes_back_in_front() {
        let b = ResultBuffer::new(4, 10);
        for i in 0..3 {
            b.push(i);
        }
        let batch = b.take(2);
        assert_eq!(b.pending(), 3);
        b.push(3);
        b.push(4);
        b.restore(batch);
        // 0 and 1 are back in front; the buffer holds 4, so the oldest (0) is dropped.
        assert_eq!(b.dropped(), 1);
        assert_eq!(b.take(10), vec![1, 2, 3, 4]);
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_too() {
        let b: ResultBuffer<String> = ResultBuffer::bounded(100, 10, 100, String::len);
        for s in ["aaaa", "bbbb", "cccc"] {
            b.push(s.to_owned());
        }
        // 12 bytes over a bound of 10: the oldest goes.
        assert_eq!(b.dropped(), 1);
        assert_eq!(b.take(10), ["bbbb", "cccc"]);
        // One result larger than the bound alone is kept rather than lost.
        b.push("x".repeat(50));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn written_clears_pending() {
        let b = ResultBuffer::new(4, 10);
        b.push(1);
        let batch = b.take(5);
        b.written(batch.len());
        assert_eq!(b.pending(), 0);
        assert_eq!(b.len(), 0);
    }
}
