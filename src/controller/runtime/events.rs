//! The Event recorder: what kube's `Recorder` does (the same requests), with a compact cache.
//!
//! Like kube's, it remembers each event it published for 6 minutes, by its type, action,
//! reason, regarding and related objects, so that the same event again within that time is a
//! merge patch of the first with a `series` (count and last time) instead of a new Event. kube's
//! recorder keeps a whole `events.k8s.io/v1` Event and a second copy of its references per
//! entry, inline in its table: about 3 KB per event, 3.3 MB after a burst of 1,000 launches,
//! and it only forgets old entries on the next publish. This one keeps the key and what the
//! first event had of its own (name, time, note): the patch is rebuilt from them, field for
//! field as kube sends it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Client, ResourceExt};
use tokio::sync::Mutex;

/// How long a published event is remembered (kube's `CACHE_TTL`).
const CACHE_TTL: SignedDuration = SignedDuration::from_mins(6);

/// An object reference compared on every field and hashed on its identity, as kube's.
#[derive(Debug, Clone, PartialEq)]
struct Reference(ObjectReference);

impl Eq for Reference {}

impl Hash for Reference {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.api_version.hash(state);
        self.0.kind.hash(state);
        self.0.name.hash(state);
        self.0.namespace.hash(state);
        self.0.uid.hash(state);
    }
}

/// What makes two events the same (kube's `EventKey`; the reporter is the recorder's own).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Key {
    type_: EventType,
    action: String,
    reason: String,
    regarding: Reference,
    related: Option<Reference>,
}

/// What the first publication of an event had of its own, and its series so far.
#[derive(Debug, Clone)]
struct Published {
    name: String,
    event_time: Timestamp,
    note: Option<String>,
    series: Option<EventSeries>,
}

impl Published {
    fn last_seen(&self) -> Timestamp {
        self.series
            .as_ref()
            .map_or(self.event_time, |s| s.last_observed_time.0)
    }
}

/// How often at most the whole cache is swept for entries past [`CACHE_TTL`] (each lookup
/// ignores an expired entry anyway): sweeping on every publish would cost a pass over every
/// event of the last 6 minutes per event, when expiry ends thousands of sessions at once.
const PRUNE_EVERY: SignedDuration = SignedDuration::from_secs(10);

/// Events published in the last [`CACHE_TTL`].
#[derive(Default)]
struct Cache {
    entries: HashMap<Box<Key>, Published>,
    pruned: Option<Timestamp>,
}

impl Cache {
    /// The event published for `key` within [`CACHE_TTL`] before `now`; sweeps out old entries
    /// at most every [`PRUNE_EVERY`].
    fn live(&mut self, key: &Key, now: Timestamp) -> Option<&Published> {
        if self
            .pruned
            .is_none_or(|t| now.duration_since(t) >= PRUNE_EVERY)
        {
            self.entries.retain(|_, p| p.last_seen() + CACHE_TTL > now);
            self.pruned = Some(now);
        }
        self.entries
            .get(key)
            .filter(|p| p.last_seen() + CACHE_TTL > now)
    }
}

/// Publishes Events (`events.k8s.io/v1`) about objects, aggregating repeats into series.
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    cache: Mutex<Cache>,
}

impl Recorder {
    /// A recorder reporting as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            cache: Mutex::default(),
        }
    }

    /// The Event as sent: the first publication's, with `series` if it is a repeat.
    fn event(&self, key: &Key, namespace: Option<String>, p: &Published) -> K8sEvent {
        K8sEvent {
            action: Some(key.action.clone()),
            reason: Some(key.reason.clone()),
            deprecated_count: None,
            deprecated_first_timestamp: None,
            deprecated_last_timestamp: None,
            deprecated_source: None,
            event_time: Some(MicroTime(p.event_time)),
            regarding: Some(key.regarding.0.clone()),
            note: p.note.clone(),
            metadata: ObjectMeta {
                namespace,
                name: Some(p.name.clone()),
                ..Default::default()
            },
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            series: p.series.clone(),
            type_: Some(
                match key.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            related: key.related.as_ref().map(|r| r.0.clone()),
        }
    }

    /// Publishes `ev` about `reference`: a new Event, or a patch of the same one published
    /// within the last 6 minutes with its count raised. The Event goes in the reference's
    /// namespace (`default` without one).
    pub async fn publish(
        &self,
        ev: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = Box::new(Key {
            type_: ev.type_,
            action: ev.action.clone(),
            reason: ev.reason.clone(),
            regarding: Reference(reference.clone()),
            related: ev.secondary.clone().map(Reference),
        });
        let published = {
            let mut cache = self.cache.lock().await;
            match cache.live(&key, now) {
                Some(p) => Published {
                    series: Some(EventSeries {
                        count: p.series.as_ref().map_or(2, |s| s.count + 1),
                        last_observed_time: MicroTime(now),
                    }),
                    ..p.clone()
                },
                None => Published {
                    name: format!(
                        "{}.{:x}",
                        reference.name.as_ref().unwrap_or(&self.reporter.controller),
                        now.as_nanosecond()
                    ),
                    event_time: now,
                    note: ev.note.clone(),
                    series: None,
                },
            }
        };
        let event = self.event(&key, reference.namespace.clone(), &published);
        let events: Api<K8sEvent> = Api::namespaced(
            self.client.clone(),
            reference.namespace.as_deref().unwrap_or("default"),
        );
        if event.series.is_some() {
            events
                .patch(
                    &event.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&event),
                )
                .await?;
        } else {
            events.create(&PostParams::default(), &event).await?;
        }
        self.cache.lock().await.entries.insert(key, published);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(rv: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("cubicle.dev/v1alpha1".into()),
            kind: Some("Session".into()),
            name: Some("s-1".into()),
            namespace: Some("ns".into()),
            uid: Some("u".into()),
            resource_version: Some(rv.into()),
            field_path: None,
        }
    }

    fn key(rv: &str) -> Key {
        Key {
            type_: EventType::Normal,
            action: "Launch".into(),
            reason: "Running".into(),
            regarding: Reference(reference(rv)),
            related: None,
        }
    }

    #[test]
    fn an_old_event_is_never_repeated_and_is_swept_out_at_most_every_ten_seconds() {
        let t = |s: i64| Timestamp::from_second(s).unwrap();
        let published = |at: i64| Published {
            name: "s-1.abc".into(),
            event_time: t(at),
            note: None,
            series: None,
        };
        let mut cache = Cache::default();
        assert!(cache.live(&key("1"), t(1_000)).is_none()); // sweeps (first time)
        cache.entries.insert(Box::new(key("1")), published(1_000));
        // Within the TTL: a repeat.
        assert!(cache.live(&key("1"), t(1_000 + 359)).is_some());
        // (That lookup swept the map, at 1,359.) Past the TTL: not a repeat, though the entry
        // stays in the map until the next sweep, 10 s after the last one.
        cache.entries.insert(Box::new(key("2")), published(1_000));
        assert!(cache.live(&key("2"), t(1_360)).is_none());
        assert!(cache.entries.contains_key(&key("2")));
        assert!(cache.live(&key("2"), t(1_368)).is_none());
        assert!(cache.entries.contains_key(&key("2")));
        assert!(cache.live(&key("2"), t(1_369)).is_none());
        assert!(!cache.entries.contains_key(&key("2")));
        assert!(!cache.entries.contains_key(&key("1")));
    }

    #[test]
    fn keys_compare_every_field_of_the_reference_as_kube_does() {
        assert_eq!(key("1"), key("1"));
        assert_ne!(key("1"), key("2"));
    }

    #[test]
    fn a_repeat_is_the_first_event_with_a_series() {
        let first = Published {
            name: "s-1.abc".into(),
            event_time: Timestamp::from_second(1_000).unwrap(),
            note: Some("pod is running".into()),
            series: None,
        };
        assert_eq!(first.last_seen(), first.event_time);
        let later = Timestamp::from_second(1_100).unwrap();
        let repeat = Published {
            series: Some(EventSeries {
                count: 2,
                last_observed_time: MicroTime(later),
            }),
            ..first.clone()
        };
        assert_eq!(repeat.last_seen(), later);
    }
}
