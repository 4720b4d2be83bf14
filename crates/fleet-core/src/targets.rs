//! A cycle's selection, packed: every target's text in one buffer and its fixed fields in one
//! array of 48-byte records, so that a selection of 100,000 servers is two allocations of
//! about 11 MB together instead of 400,000 small ones of about 34 MB.
//!
//! Small allocations by the hundred thousand also fragment the allocator's heap, which then
//! stays resident after they are freed; two large ones are mapped and unmapped whole. A check
//! unpacks its one target ([`TargetRef::to_target`]) as it starts and drops it as it ends.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::Fence;
use crate::model::{ApiToken, HealthStatus, ProbeTarget, ServerId, ServerKind};

/// The fields most targets leave empty, boxed so that the others do not pay for them.
#[derive(Clone, Debug, Default, PartialEq)]
struct Rare {
    unreadable_token: Option<String>,
    metrics_path: Option<String>,
    ca_cert: Option<String>,
    /// A lease the selection's table of leases has no room for.
    fence: Option<Fence>,
    /// The name, URL and token, in that order, of a target whose text would start past what
    /// a `u32` offset reaches (a selection of more than 4 GiB of text).
    text: Option<String>,
}

/// One target's fixed fields, 48 bytes; its name, URL and token are `text[start..]`, in that
/// order, and its lease is `fences[fence]`: a selection's leases are few (one per bucket), so
/// each target keeps a 2-byte index where a [`Fence`] takes 24.
#[derive(Clone, Debug)]
struct Packed {
    id: ServerId,
    start: u32,
    name_len: u32,
    url_len: u32,
    /// [`NO_TOKEN`] when the server has no token.
    token_len: u32,
    /// The store's age of the last check in whole milliseconds, rounded down (so that a hold
    /// is never cut short); [`UNKNOWN_AGE`] when unknown.
    checked_ago_ms: u32,
    /// [`NO_FENCE`] when the target has no lease, or keeps it in `rare`.
    fence: u16,
    health: Option<HealthStatus>,
    kind: ServerKind,
    rare: Option<Box<Rare>>,
}

const NO_TOKEN: u32 = u32::MAX;
const UNKNOWN_AGE: u32 = u32::MAX;
const NO_FENCE: u16 = u16::MAX;
/// Where the shared text ends: a target that would start past it keeps its own. Small in
/// unit tests, so that they cover that path without 4 GiB of text.
const TEXT_LIMIT: u32 = if cfg!(test) { 4096 } else { NO_TOKEN };

/// Appends `s` to `text`, cut at the largest length a `u32` holds (on a character boundary,
/// and below [`NO_TOKEN`]); returns the length kept.
fn append(text: &mut String, s: &str) -> u32 {
    let mut end = s.len().min(NO_TOKEN as usize - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    text.push_str(&s[..end]);
    end as u32
}

/// A selection's targets, in order, packed. Built with [`Targets::push`] or collected from
/// [`ProbeTarget`]s; read back with [`Targets::get`] and [`Targets::iter`], which unpack.
#[derive(Clone, Default)]
pub struct Targets {
    text: String,
    items: Vec<Packed>,
    /// The distinct leases of the targets, which `Packed::fence` indexes.
    fences: Vec<Fence>,
    /// Where each lease is in `fences`, while the selection is built; dropped by
    /// [`Targets::shrink_to_fit`].
    fence_index: std::collections::HashMap<Fence, u16>,
}

impl Targets {
    /// No targets.
    pub fn new() -> Self {
        Self::default()
    }

    /// No targets, with room for `n` of them.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            text: String::with_capacity(n * 64),
            items: Vec::with_capacity(n),
            ..Self::default()
        }
    }

    /// Appends `target`. A name, URL or token longer than 4 GiB is cut there (no registry
    /// accepts one).
    pub fn push(&mut self, target: ProbeTarget) {
        let mut rare = Rare {
            unreadable_token: target.unreadable_token,
            metrics_path: target.metrics_path,
            ca_cert: target.ca_cert,
            ..Rare::default()
        };
        let fence = match target.fence {
            None => NO_FENCE,
            Some(f) => self.fence_slot(f).unwrap_or_else(|| {
                rare.fence = Some(f);
                NO_FENCE
            }),
        };
        let start = u32::try_from(self.text.len())
            .ok()
            .filter(|&start| start < TEXT_LIMIT);
        let text = match start {
            Some(_) => &mut self.text,
            None => rare.text.insert(String::new()),
        };
        let name_len = append(text, &target.name);
        let url_len = append(text, &target.api_url);
        let token_len = match &target.token {
            Some(token) => append(text, token.expose()),
            None => NO_TOKEN,
        };
        let rare = (rare != Rare::default()).then(|| Box::new(rare));
        self.items.push(Packed {
            id: target.id,
            start: start.unwrap_or(0),
            name_len,
            url_len,
            token_len,
            checked_ago_ms: target.checked_ago.map_or(UNKNOWN_AGE, |d| {
                u32::try_from(d.as_millis()).unwrap_or(UNKNOWN_AGE - 1)
            }),
            fence,
            health: target.health,
            kind: target.kind,
            rare,
        });
    }

    /// `fence`'s place in the table of leases, added when new; `None` when the table is full.
    fn fence_slot(&mut self, fence: Fence) -> Option<u16> {
        if let Some(&i) = self.fence_index.get(&fence) {
            return Some(i);
        }
        let i = u16::try_from(self.fences.len())
            .ok()
            .filter(|&i| i < NO_FENCE)?;
        self.fences.push(fence);
        self.fence_index.insert(fence, i);
        Some(i)
    }

    /// Gives back spare capacity; a store calls it once the selection is complete.
    pub fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.items.shrink_to_fit();
        self.fences.shrink_to_fit();
        self.fence_index = std::collections::HashMap::new();
    }

    /// How many targets.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes held, capacity included: what the selection costs in memory.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity()
            + self.items.capacity() * std::mem::size_of::<Packed>()
            + self.fences.capacity() * std::mem::size_of::<Fence>()
            + self.items.iter().filter(|p| p.rare.is_some()).count() * std::mem::size_of::<Rare>()
    }

    fn item(&self, i: usize) -> &Packed {
        &self.items[i]
    }

    /// A target's name, URL and token, each `None` past its end.
    fn texts<'a>(&'a self, p: &'a Packed) -> (&'a str, &'a str, Option<&'a str>) {
        let (text, start) = match p.rare.as_deref().and_then(|r| r.text.as_deref()) {
            Some(spilled) => (spilled, 0),
            None => (self.text.as_str(), p.start as usize),
        };
        let url_start = start + p.name_len as usize;
        let token_start = url_start + p.url_len as usize;
        let token = (p.token_len != NO_TOKEN)
            .then(|| &text[token_start..token_start + p.token_len as usize]);
        (
            &text[start..url_start],
            &text[url_start..token_start],
            token,
        )
    }

    fn fence_of(&self, p: &Packed) -> Option<Fence> {
        match p.fence {
            NO_FENCE => p.rare.as_deref().and_then(|r| r.fence),
            i => self.fences.get(usize::from(i)).copied(),
        }
    }

    /// The `i`th target's id.
    ///
    /// # Panics
    /// When `i` is out of range, as slice indexing does.
    pub fn id(&self, i: usize) -> ServerId {
        self.item(i).id
    }

    /// The `i`th target's name.
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn name(&self, i: usize) -> &str {
        self.texts(self.item(i)).0
    }

    /// The `i`th target's age as the store gave it, to the millisecond (rounded down).
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn checked_ago(&self, i: usize) -> Option<Duration> {
        let ago = self.item(i).checked_ago_ms;
        (ago != UNKNOWN_AGE).then(|| Duration::from_millis(u64::from(ago)))
    }

    /// The `i`th target's health when it was selected.
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn health(&self, i: usize) -> Option<HealthStatus> {
        self.item(i).health
    }

    /// The lease the `i`th target was selected under.
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn fence(&self, i: usize) -> Option<Fence> {
        self.fence_of(self.item(i))
    }

    /// The `i`th target, unpacked; `None` when out of range.
    pub fn get(&self, i: usize) -> Option<ProbeTarget> {
        let p = self.items.get(i)?;
        let (name, api_url, token) = self.texts(p);
        let rare = p.rare.as_deref();
        Some(ProbeTarget {
            id: p.id,
            name: name.to_owned(),
            api_url: api_url.to_owned(),
            token: token.map(ApiToken::new),
            unreadable_token: rare.and_then(|r| r.unreadable_token.clone()),
            health: p.health,
            kind: p.kind,
            metrics_path: rare.and_then(|r| r.metrics_path.clone()),
            ca_cert: rare.and_then(|r| r.ca_cert.clone()),
            fence: self.fence_of(p),
            checked_ago: self.checked_ago(i),
        })
    }

    /// The targets, unpacked one at a time.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = ProbeTarget> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("in range"))
    }

    /// The ids, in order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = ServerId> + '_ {
        self.items.iter().map(|p| p.id)
    }

    /// Every target, unpacked.
    pub fn to_vec(&self) -> Vec<ProbeTarget> {
        self.iter().collect()
    }

    /// A handle on each target, sharing this selection.
    pub fn into_refs(self) -> Vec<TargetRef> {
        let n = self.len();
        let list = Arc::new(self);
        (0..n)
            .map(|i| TargetRef {
                list: Arc::clone(&list),
                index: i,
            })
            .collect()
    }
}

impl fmt::Debug for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries((0..self.len()).map(|i| self.name(i)))
            .finish()
    }
}

impl PartialEq for Targets {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl FromIterator<ProbeTarget> for Targets {
    fn from_iter<I: IntoIterator<Item = ProbeTarget>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut targets = Self::with_capacity(iter.size_hint().0);
        for t in iter {
            targets.push(t);
        }
        targets.shrink_to_fit();
        targets
    }
}

impl IntoIterator for Targets {
    type Item = ProbeTarget;
    type IntoIter = IntoIter;

    fn into_iter(self) -> IntoIter {
        IntoIter {
            targets: self,
            next: 0,
        }
    }
}

/// The targets of a [`Targets`], unpacked one at a time.
#[derive(Debug)]
pub struct IntoIter {
    targets: Targets,
    next: usize,
}

impl Iterator for IntoIter {
    type Item = ProbeTarget;

    fn next(&mut self) -> Option<ProbeTarget> {
        let t = self.targets.get(self.next)?;
        self.next += 1;
        Some(t)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.targets.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for IntoIter {}

impl From<Vec<ProbeTarget>> for Targets {
    fn from(v: Vec<ProbeTarget>) -> Self {
        v.into_iter().collect()
    }
}

/// One target of a shared selection: what the engine holds per target of a cycle, 16 bytes,
/// cheap to clone.
#[derive(Clone)]
pub struct TargetRef {
    list: Arc<Targets>,
    index: usize,
}

impl TargetRef {
    /// A selection of one.
    pub fn single(target: ProbeTarget) -> Self {
        let mut list = Targets::with_capacity(1);
        list.push(target);
        list.shrink_to_fit();
        Self {
            list: Arc::new(list),
            index: 0,
        }
    }

    /// Its id.
    pub fn id(&self) -> ServerId {
        self.list.id(self.index)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.list.name(self.index)
    }

    /// Its age as the store gave it.
    pub fn checked_ago(&self) -> Option<Duration> {
        self.list.checked_ago(self.index)
    }

    /// Its health when it was selected.
    pub fn health(&self) -> Option<HealthStatus> {
        self.list.health(self.index)
    }

    /// The lease it was selected under.
    pub fn fence(&self) -> Option<Fence> {
        self.list.fence(self.index)
    }

    /// The target, unpacked.
    pub fn to_target(&self) -> ProbeTarget {
        self.list.get(self.index).expect("a ref is made in range")
    }
}

impl fmt::Debug for TargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TargetRef").field(&self.name()).finish()
    }
}

impl From<ProbeTarget> for TargetRef {
    fn from(target: ProbeTarget) -> Self {
        Self::single(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str) -> ProbeTarget {
        ProbeTarget {
            id: ServerId::new(),
            name: name.to_owned(),
            api_url: format!("http://127.0.0.1:9/{name}"),
            token: None,
            unreadable_token: None,
            health: None,
            kind: ServerKind::Fleet,
            metrics_path: None,
            ca_cert: None,
            fence: None,
            checked_ago: None,
        }
    }

    #[test]
    fn a_target_takes_48_bytes_besides_its_text() {
        assert_eq!(std::mem::size_of::<Packed>(), 48);
    }

    #[test]
    fn targets_past_the_shared_text_and_the_lease_table_keep_their_own() {
        let all: Vec<ProbeTarget> = (0..80_000u32)
            .map(|i| ProbeTarget {
                token: (i % 3 == 0).then(|| ApiToken::new(format!("token-{i}"))),
                fence: (i % 7 != 0).then_some(Fence {
                    bucket: (i % 1024) as u16,
                    epoch: i64::from(i),
                }),
                checked_ago: Some(Duration::from_millis(u64::from(i))),
                ..target(&format!("web-{i}"))
            })
            .collect();
        let packed = Targets::from(all.clone());
        assert!(
            packed.fences.len() == usize::from(NO_FENCE),
            "the table filled up"
        );
        assert!(
            packed
                .items
                .iter()
                .any(|p| p.rare.as_ref().is_some_and(|r| r.fence.is_some()))
        );
        assert!(
            packed
                .items
                .iter()
                .any(|p| p.rare.as_ref().is_some_and(|r| r.text.is_some()))
        );
        assert_eq!(packed.to_vec(), all);
        assert_eq!(packed.name(79_999), "web-79999");
        assert_eq!(packed.fence(79_999), all[79_999].fence);
    }

    #[test]
    fn an_age_is_kept_to_the_millisecond_and_rounded_down() {
        let packed = Targets::from(vec![ProbeTarget {
            checked_ago: Some(Duration::new(29, 999_999_999)),
            ..target("a")
        }]);
        assert_eq!(packed.checked_ago(0), Some(Duration::from_millis(29_999)));
    }

    #[test]
    fn every_field_comes_back_as_it_went_in() {
        let plain = target("web-1");
        let full = ProbeTarget {
            token: Some(ApiToken::new("sëcret-tøken")),
            unreadable_token: Some("key-2".into()),
            health: Some(HealthStatus::Degraded),
            kind: ServerKind::NodeExporter,
            metrics_path: Some("/node/metrics".into()),
            ca_cert: Some("-----BEGIN CERTIFICATE-----".into()),
            fence: Some(Fence {
                bucket: 41,
                epoch: -7,
            }),
            checked_ago: Some(Duration::from_millis(29_999)),
            ..target("db-ü")
        };
        let empty_token = ProbeTarget {
            token: Some(ApiToken::new("")),
            checked_ago: Some(Duration::ZERO),
            ..target("")
        };
        let all = vec![plain, full, empty_token];
        let packed = Targets::from(all.clone());
        assert_eq!(packed.len(), 3);
        assert_eq!(packed.to_vec(), all);
        assert_eq!(packed.name(1), "db-ü");
        assert_eq!(packed.checked_ago(0), None);
        assert_eq!(packed.checked_ago(2), Some(Duration::ZERO));
        assert_eq!(packed.get(3), None);
        let refs = packed.into_refs();
        assert_eq!(refs[1].to_target(), all[1]);
        assert_eq!(refs[1].id(), all[1].id);
        assert_eq!(refs[2].name(), "");
    }

    #[test]
    fn tokens_stay_out_of_debug_output() {
        let t = ProbeTarget {
            token: Some(ApiToken::new("do-not-print")),
            ..target("web-1")
        };
        let packed = Targets::from(vec![t.clone()]);
        assert!(!format!("{packed:?}").contains("do-not-print"));
        assert!(!format!("{:?}", TargetRef::single(t)).contains("do-not-print"));
    }

    #[test]
    fn a_packed_selection_is_much_smaller_than_its_targets() {
        let packed: Targets = (0..1000)
            .map(|i| ProbeTarget {
                token: Some(ApiToken::new("t".repeat(43))),
                ..target(&format!("server-{i:05}"))
            })
            .collect();
        // Unpacked, a target is 208 bytes of ProbeTarget and three allocations of about
        // 150 bytes more.
        assert!(
            packed.heap_bytes() < 1000 * 180,
            "{} bytes",
            packed.heap_bytes()
        );
    }
}
