//! Several instances sharing one fleet: hash buckets, leases, fences and the leader.
//!
//! Servers fall into [`BUCKETS`] buckets by id; buckets, not servers, are leased. Each live
//! instance wants the buckets that rendezvous hashing gives it ([`share`]), so a joiner takes
//! about 1/(N+1) of them and a leaver gives up only its own. A [`Membership`] heartbeats
//! through a [`Leases`] backend (PostgreSQL in fleet-pg), which decides every expiry on its own
//! clock: it renews what this instance owns, releases what another live instance should have,
//! and takes free buckets at once and expired ones only when no database outage ended within
//! the last TTL, so that an instance coming back from an outage renews its own leases first.
//!
//! Every scheduled result carries the [`Fence`] of its bucket as it was when the check was
//! selected; the store writes it only while the bucket still has that owner and epoch, so an
//! instance that wakes up late cannot write over its successor.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::ServerId;
use crate::store::StoreError;

/// The number of buckets servers are hashed into.
pub const BUCKETS: u16 = 1024;

/// A server's bucket: the last two bytes of its id, modulo [`BUCKETS`]. The PostgreSQL
/// schema computes the same in a generated column.
pub fn bucket_of(id: ServerId) -> u16 {
    let b = id.0.as_bytes();
    (u16::from(b[14]) << 8 | u16::from(b[15])) % BUCKETS
}

/// The lease a scheduled check was selected under: its server's bucket and that bucket's
/// epoch then. A write carrying it lands only while the bucket keeps that owner and epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The bucket.
    pub bucket: u16,
    /// The bucket's epoch when the check was selected.
    pub epoch: i64,
}

/// The weight of `instance` for `bucket` in rendezvous hashing: FNV-1a over both, finished
/// with the SplitMix64 mixer. Fixed here, not `std`'s hasher, so that every build agrees.
pub fn weight(instance: &str, bucket: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in instance.bytes().chain(bucket.to_le_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Which of `live` instances should own `bucket`: the one of highest weight, ties to the
/// smaller id. `None` when there is no live instance.
pub fn owner_of(bucket: u16, live: &[String]) -> Option<&str> {
    live.iter()
        .map(|id| (weight(id, bucket), std::cmp::Reverse(id.as_str())))
        .max()
        .map(|(_, std::cmp::Reverse(id))| id)
}

/// The buckets `me` should own among `live` instances (`me` counts as live).
pub fn share(me: &str, live: &[String]) -> BTreeSet<u16> {
    let mut all: Vec<String> = live.to_vec();
    if !all.iter().any(|i| i == me) {
        all.push(me.to_owned());
    }
    (0..BUCKETS)
        .filter(|&b| owner_of(b, &all) == Some(me))
        .collect()
}

/// One bucket held: its number and epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The bucket.
    pub bucket: u16,
    /// Its epoch.
    pub epoch: i64,
}

/// What a heartbeat found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Beat {
    /// The instances whose heartbeat is younger than the lease TTL, this one included.
    pub live: Vec<String>,
    /// The buckets this instance still owns, all renewed, their epochs unchanged.
    pub owned: Vec<Lease>,
}

/// An instance as listed by [`Leases::instances`].
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceRecord {
    /// Its id.
    pub id: String,
    /// The version it runs.
    pub version: String,
    /// Seconds since its last heartbeat, by the database's clock.
    pub heartbeat_age_seconds: f64,
    /// Whether that is within the lease TTL.
    pub live: bool,
    /// Buckets it owns (unexpired or not yet taken over).
    pub buckets: u64,
    /// Active servers in those buckets.
    pub servers: u64,
    /// Whether it holds the leader's lease.
    pub leader: bool,
}

/// Where leases live. Every expiry is decided on the backend's clock.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Registers or refreshes `me` and renews, in one statement, every bucket it still owns
    /// (expired or not, as long as nobody took it), leaving epochs unchanged. Also removes
    /// instance rows silent for much longer than the TTL.
    async fn beat(&self, me: &InstanceMeta, ttl: Duration) -> Result<Beat, StoreError>;

    /// Gives up `buckets` (those `me` owns), so that another instance may take them at once.
    async fn release(&self, me: &str, buckets: &[u16]) -> Result<u64, StoreError>;

    /// Takes those of `buckets` that nobody holds, and, when `take_expired`, those whose
    /// lease expired; each taken bucket's epoch grows by one. Returns the buckets taken.
    async fn acquire(
        &self,
        me: &str,
        buckets: &[u16],
        ttl: Duration,
        take_expired: bool,
    ) -> Result<Vec<Lease>, StoreError>;

    /// Renews the leader's lease if `me` holds it, or takes it when nobody does (or, when
    /// `take_expired`, when it expired), growing its epoch. Returns the epoch when `me` leads.
    async fn lead(
        &self,
        me: &str,
        ttl: Duration,
        take_expired: bool,
    ) -> Result<Option<i64>, StoreError>;

    /// Releases every lease of `me` and removes its instance row.
    async fn leave(&self, me: &str) -> Result<(), StoreError>;

    /// Every registered instance.
    async fn instances(&self, ttl: Duration) -> Result<Vec<InstanceRecord>, StoreError>;
}

/// Who this instance is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceMeta {
    /// Stable across restarts, unique among instances.
    pub id: String,
    /// The version it runs.
    pub version: String,
}

/// How often to heartbeat and how long a lease lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimes {
    /// Between heartbeats. Default 5 s.
    pub heartbeat: Duration,
    /// How long a lease (and an instance's liveness) lasts without a heartbeat. Default 20 s.
    pub ttl: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            ttl: Duration::from_secs(20),
        }
    }
}

/// This instance's share of the fleet, as last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShareSnapshot {
    /// This instance's id.
    pub instance_id: String,
    /// Live instances, this one included, at the last heartbeat.
    pub live_instances: u64,
    /// Buckets this instance owns.
    pub buckets_owned: u64,
    /// The leader's epoch when this instance leads.
    pub leader_epoch: Option<i64>,
    /// Buckets taken (from nobody or from an expired owner) since start.
    pub takeovers: u64,
    /// Buckets given up to another instance since start.
    pub releases: u64,
    /// Fenced writes refused because their bucket changed hands, dropped as superseded.
    pub fenced_writes_rejected: u64,
    /// The last heartbeat's error, while heartbeats fail.
    pub last_error: Option<String>,
}

/// Shared, cheap to clone: the share this instance holds, and the counters stores add to.
#[derive(Clone, Debug, Default)]
pub struct ClusterStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    share: Mutex<ShareSnapshot>,
    rejected: AtomicU64,
}

impl ClusterStats {
    /// Empty figures for instance `id`.
    pub fn new(id: &str) -> Self {
        let s = Self::default();
        s.lock().instance_id = id.to_owned();
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ShareSnapshot> {
        self.inner.share.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `n` fenced writes refused as superseded.
    pub fn add_rejected(&self, n: u64) {
        if n > 0 {
            self.inner.rejected.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Records whether this instance leads, and under which epoch. [`Membership`] keeps it;
    /// an embedder electing its leader otherwise sets it here.
    pub fn set_leader(&self, epoch: Option<i64>) {
        self.lock().leader_epoch = epoch;
    }

    /// The figures now.
    pub fn snapshot(&self) -> ShareSnapshot {
        let mut s = self.lock().clone();
        s.fenced_writes_rejected = self.inner.rejected.load(Ordering::Relaxed);
        s
    }
}

/// This instance's membership: heartbeats, takes and gives buckets, holds the leader's lease.
pub struct Membership {
    leases: Arc<dyn Leases>,
    me: InstanceMeta,
    times: LeaseTimes,
    stats: ClusterStats,
    /// Takeovers of expired leases wait until then: one TTL after the backend came back.
    takeover_gate: Option<Instant>,
    failing: bool,
    /// Workers asked to catch up when buckets are taken, so that their overdue servers are
    /// checked without waiting for the next tick.
    catch_ups: Vec<crate::engine::CatchUp>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("me", &self.me)
            .field("times", &self.times)
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// A membership of `me` through `leases`.
    pub fn new(leases: Arc<dyn Leases>, me: InstanceMeta, times: LeaseTimes) -> Self {
        Self {
            stats: ClusterStats::new(&me.id),
            leases,
            me,
            times,
            takeover_gate: None,
            failing: false,
            catch_ups: Vec::new(),
        }
    }

    /// Asks `worker` to catch up whenever this instance takes buckets.
    pub fn on_takeover(&mut self, worker: crate::engine::CatchUp) {
        self.catch_ups.push(worker);
    }

    /// The figures this membership keeps; hand them to the store for its rejected writes.
    pub fn stats(&self) -> ClusterStats {
        self.stats.clone()
    }

    /// One heartbeat: renew, then release what another live instance should own, then take
    /// what this one should. Errors are recorded and returned; the next round tries again.
    pub async fn round(&mut self) -> Result<(), StoreError> {
        match self.try_round().await {
            Ok(()) => {
                self.failing = false;
                self.stats.lock().last_error = None;
                Ok(())
            }
            Err(e) => {
                if !self.failing {
                    tracing::error!(target: "fleet::cluster", error = %e, "heartbeat failed: {e}; leases are kept while nobody takes them");
                }
                self.failing = true;
                self.stats.lock().last_error = Some(format!("heartbeat failed: {e}"));
                Err(e)
            }
        }
    }

    async fn try_round(&mut self) -> Result<(), StoreError> {
        let ttl = self.times.ttl;
        let beat = self.leases.beat(&self.me, ttl).await?;
        if self.failing {
            // Back from an outage: every lease may have expired. Ours are renewed (above);
            // others' wait one TTL so that their owners can renew theirs first.
            self.takeover_gate = Some(Instant::now() + ttl);
            tracing::info!(target: "fleet::cluster", "heartbeat works again; renewed {} buckets, taking over expired ones after {ttl:?}", beat.owned.len());
        }
        let take_expired = self.takeover_gate.is_none_or(|at| Instant::now() >= at);
        let wanted = share(&self.me.id, &beat.live);
        let owned: BTreeSet<u16> = beat.owned.iter().map(|l| l.bucket).collect();
        let give: Vec<u16> = owned.difference(&wanted).copied().collect();
        let take: Vec<u16> = wanted.difference(&owned).copied().collect();
        let released = if give.is_empty() {
            0
        } else {
            self.leases.release(&self.me.id, &give).await?
        };
        let taken = if take.is_empty() {
            Vec::new()
        } else {
            self.leases
                .acquire(&self.me.id, &take, ttl, take_expired)
                .await?
        };
        let leader = self.leases.lead(&self.me.id, ttl, take_expired).await?;
        if !taken.is_empty() {
            for worker in &self.catch_ups {
                worker.request();
            }
        }
        if !taken.is_empty() || released > 0 {
            tracing::info!(target: "fleet::cluster", taken = taken.len(), released, live = beat.live.len(), "took {} buckets, released {released}", taken.len());
        }
        let mut s = self.stats.lock();
        if leader.is_some() && s.leader_epoch.is_none() {
            tracing::info!(target: "fleet::cluster", epoch = leader, "this instance leads fleet-wide jobs");
        }
        s.live_instances = beat.live.len().max(1) as u64;
        s.buckets_owned = (owned.len() - released as usize + taken.len()) as u64;
        s.takeovers += taken.len() as u64;
        s.releases += released;
        s.leader_epoch = leader;
        Ok(())
    }

    /// Heartbeats every interval (the first one interval from now) until `cancel` fires,
    /// then leaves: its buckets and the leader's lease are released at once, and its
    /// instance row removed.
    pub async fn run(mut self, cancel: CancellationToken) {
        // The first round is the caller's (before its workers select), so the loop waits one
        // heartbeat first.
        let mut tick =
            tokio::time::interval_at(Instant::now() + self.times.heartbeat, self.times.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let _ = self.round().await;
        }
        match tokio::time::timeout(self.times.heartbeat, self.leases.leave(&self.me.id)).await {
            Ok(Ok(())) => {
                tracing::info!(target: "fleet::cluster", "left: leases released");
            }
            Ok(Err(e)) => {
                tracing::warn!(target: "fleet::cluster", error = %e, "could not release leases at shutdown: {e}; they expire by themselves");
            }
            Err(_) => {
                tracing::warn!(target: "fleet::cluster", "releasing leases at shutdown timed out; they expire by themselves");
            }
        }
        self.stats.lock().buckets_owned = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leases in memory, expiring on tokio's (paused) clock, as PostgreSQL's do on its own.
    #[derive(Default)]
    struct MemoryLeases {
        state: Mutex<MemState>,
    }

    #[derive(Default)]
    struct MemState {
        beats: std::collections::HashMap<String, Instant>,
        buckets: std::collections::BTreeMap<u16, (Option<String>, i64, Instant)>,
        leader: Option<(String, i64, Instant)>,
        leader_epoch: i64,
    }

    impl MemoryLeases {
        fn owned(&self, id: &str) -> usize {
            let s = self.state.lock().unwrap();
            s.buckets
                .values()
                .filter(|(o, _, _)| o.as_deref() == Some(id))
                .count()
        }
    }

    #[async_trait]
    impl Leases for MemoryLeases {
        async fn beat(&self, me: &InstanceMeta, ttl: Duration) -> Result<Beat, StoreError> {
            let now = Instant::now();
            let mut s = self.state.lock().unwrap();
            s.beats.insert(me.id.clone(), now);
            let mut owned = Vec::new();
            for (b, (owner, epoch, expires)) in s.buckets.iter_mut() {
                if owner.as_deref() == Some(&me.id) {
                    *expires = now + ttl;
                    owned.push(Lease {
                        bucket: *b,
                        epoch: *epoch,
                    });
                }
            }
            let live = s
                .beats
                .iter()
                .filter(|(_, at)| now.duration_since(**at) < ttl)
                .map(|(id, _)| id.clone())
                .collect();
            Ok(Beat { live, owned })
        }
        async fn release(&self, me: &str, buckets: &[u16]) -> Result<u64, StoreError> {
            let mut s = self.state.lock().unwrap();
            let mut n = 0;
            for b in buckets {
                if let Some(l) = s.buckets.get_mut(b)
                    && l.0.as_deref() == Some(me)
                {
                    l.0 = None;
                    n += 1;
                }
            }
            Ok(n)
        }
        async fn acquire(
            &self,
            me: &str,
            buckets: &[u16],
            ttl: Duration,
            take_expired: bool,
        ) -> Result<Vec<Lease>, StoreError> {
            let now = Instant::now();
            let mut s = self.state.lock().unwrap();
            let mut taken = Vec::new();
            for b in buckets {
                let l = s.buckets.entry(*b).or_insert((None, 0, now));
                let free =
                    l.0.is_none() || (take_expired && l.2 < now && l.0.as_deref() != Some(me));
                if free {
                    *l = (Some(me.to_owned()), l.1 + 1, now + ttl);
                    taken.push(Lease {
                        bucket: *b,
                        epoch: l.1,
                    });
                }
            }
            Ok(taken)
        }
        async fn lead(
            &self,
            me: &str,
            ttl: Duration,
            take_expired: bool,
        ) -> Result<Option<i64>, StoreError> {
            let now = Instant::now();
            let mut s = self.state.lock().unwrap();
            let holder = s.leader.clone();
            match holder {
                Some((owner, epoch, _)) if owner == me => {
                    s.leader = Some((owner, epoch, now + ttl));
                    Ok(Some(epoch))
                }
                Some((_, _, expires)) if !(take_expired && expires < now) => Ok(None),
                _ => {
                    s.leader_epoch += 1;
                    let epoch = s.leader_epoch;
                    s.leader = Some((me.to_owned(), epoch, now + ttl));
                    Ok(Some(epoch))
                }
            }
        }
        async fn leave(&self, me: &str) -> Result<(), StoreError> {
            let mut s = self.state.lock().unwrap();
            for l in s.buckets.values_mut() {
                if l.0.as_deref() == Some(me) {
                    l.0 = None;
                }
            }
            if s.leader.as_ref().is_some_and(|(o, _, _)| o == me) {
                s.leader = None;
            }
            s.beats.remove(me);
            Ok(())
        }
        async fn instances(&self, _ttl: Duration) -> Result<Vec<InstanceRecord>, StoreError> {
            Ok(Vec::new())
        }
    }

    fn member(leases: &Arc<MemoryLeases>, id: &str) -> Membership {
        Membership::new(
            leases.clone(),
            InstanceMeta {
                id: id.to_owned(),
                version: "test".to_owned(),
            },
            LeaseTimes::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_instances_buckets_move_after_the_ttl_and_the_taker_catches_up() {
        let leases = Arc::new(MemoryLeases::default());
        let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
        let mut a = member(&leases, "a:1");
        let mut b = member(&leases, "b:1");
        let catch_up = crate::engine::CatchUp::default();
        b.on_takeover(catch_up.clone());
        a.round().await.unwrap();
        b.round().await.unwrap();
        let (a_stats, b_stats) = (a.stats(), b.stats());
        let a_task = tokio::spawn(a.run(a_stop.clone()));
        tokio::spawn(b.run(b_stop.clone()));
        // Within two heartbeats the two share the buckets by rendezvous.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let live = ["a:1".to_owned(), "b:1".to_owned()];
        assert_eq!(leases.owned("a:1"), share("a:1", &live).len());
        assert_eq!(leases.owned("b:1"), share("b:1", &live).len());
        assert_eq!(
            a_stats.snapshot().buckets_owned + b_stats.snapshot().buckets_owned,
            u64::from(BUCKETS)
        );
        // A goes silent (no leave): nothing moves before the TTL, everything soon after.
        a_task.abort();
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(
            leases.owned("a:1"),
            share("a:1", &live).len(),
            "taken early"
        );
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(leases.owned("b:1"), usize::from(BUCKETS));
        assert_eq!(b_stats.snapshot().buckets_owned, u64::from(BUCKETS));
        assert!(b_stats.snapshot().leader_epoch.is_some());
        // The takeover asked B's workers to catch up.
        let requested = tokio::time::timeout(Duration::from_millis(1), catch_up.0.notified());
        assert!(requested.await.is_ok(), "no catch-up was requested");
        // B leaves on cancel: its buckets are free at once.
        b_stop.cancel();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(leases.owned("b:1"), 0);
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("host-{i}:8080")).collect()
    }

    #[test]
    fn every_bucket_has_exactly_one_owner() {
        let live = ids(3);
        let shares: Vec<BTreeSet<u16>> = live.iter().map(|me| share(me, &live)).collect();
        let total: usize = shares.iter().map(BTreeSet::len).sum();
        assert_eq!(total, usize::from(BUCKETS));
        for s in &shares {
            // About a third each.
            assert!((250..=430).contains(&s.len()), "{}", s.len());
        }
    }

    #[test]
    fn a_joiner_takes_about_its_share_and_nothing_else_moves() {
        let before = ids(3);
        let after = ids(4);
        let mut moved = 0;
        for b in 0..BUCKETS {
            let old = owner_of(b, &before).unwrap();
            let new = owner_of(b, &after).unwrap();
            if old != new {
                assert_eq!(new, "host-3:8080", "bucket {b} moved between old instances");
                moved += 1;
            }
        }
        assert!((180..=340).contains(&moved), "{moved} of 1024 moved");
    }

    #[test]
    fn a_leaver_gives_up_only_its_own() {
        let before = ids(4);
        let after: Vec<String> = before
            .iter()
            .filter(|i| *i != "host-1:8080")
            .cloned()
            .collect();
        for b in 0..BUCKETS {
            let old = owner_of(b, &before).unwrap();
            if old != "host-1:8080" {
                assert_eq!(owner_of(b, &after).unwrap(), old);
            }
        }
    }

    #[test]
    fn buckets_come_from_the_ids_last_bytes() {
        let id = ServerId("00000000-0000-0000-0000-00000000ffff".parse().unwrap());
        assert_eq!(bucket_of(id), 1023);
        let id = ServerId("ffffffff-ffff-ffff-ffff-ffffffff0400".parse().unwrap());
        assert_eq!(bucket_of(id), 0);
    }
}
