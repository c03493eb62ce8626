//! Secondary indexes over the caches: a kind's objects by namespace and key (a Session by its
//! user, server and workspace, a profile claim by its profile, a User by its username), so a
//! reconcile or a trigger finds a user's sessions without a pass over every cached Session.
//!
//! An index is kept beside its kind's reflector, in the same watch stream: what an event adds is
//! indexed before the reflector caches it ([`Index::before`]), what it removes is unindexed
//! after ([`Index::after`]). So at every instant the index names a superset of what the cache
//! holds under a key, and a lookup ([`Index::find`]) reads each named object from the cache and
//! keeps those that are (still) under the key: exactly what a scan of the cache would find.
//! Admission (a user's max sessions) counts through it, so it must never see less than the
//! cache.
//!
//! A relist (the watch's `Init` .. `InitDone`) replaces the cache at its end only; the index
//! adds what it lists as it comes, and drops at `InitDone` what the relist no longer holds.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::Event;

/// The keys an object is found under (within its namespace).
pub type Keys<K> = fn(&K) -> Vec<String>;

/// Objects of one kind by (namespace, key).
pub struct Index<K> {
    keys: Keys<K>,
    inner: RwLock<Inner>,
}

/// "namespace\0key" and "namespace\0name" identify entries across namespaces.
type Id = Arc<str>;

#[derive(Default)]
struct Inner {
    /// Key → names of the objects under it.
    by_key: HashMap<Id, HashSet<Arc<str>>>,
    /// Object → the keys it is under, as the cache holds it.
    of: HashMap<Id, Entry>,
    /// During a relist: what it listed so far (as last listed), with every key it was indexed
    /// under meanwhile.
    relist: Option<HashMap<Id, (Entry, Vec<Id>)>>,
}

#[derive(Clone)]
struct Entry {
    name: Arc<str>,
    keys: Vec<Id>,
}

fn id(ns: &str, s: &str) -> Id {
    format!("{ns}\0{s}").into()
}

impl<K> Index<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// An empty index of the keys `keys` gives each object.
    pub fn new(keys: Keys<K>) -> Self {
        Self {
            keys,
            inner: RwLock::new(Inner::default()),
        }
    }

    fn entry(&self, o: &K) -> (Id, Entry) {
        let ns = o.meta().namespace.as_deref().unwrap_or_default();
        let name = o.meta().name.as_deref().unwrap_or_default();
        let mut keys: Vec<Id> = (self.keys)(o).iter().map(|k| id(ns, k)).collect();
        keys.sort();
        keys.dedup();
        (
            id(ns, name),
            Entry {
                name: name.into(),
                keys,
            },
        )
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Indexes what `ev` adds; call before the reflector applies it.
    pub fn before(&self, ev: &Event<K>) {
        let mut inner = self.write();
        match ev {
            Event::Init => inner.relist = Some(HashMap::new()),
            Event::Apply(o) | Event::InitApply(o) => {
                let (oid, mut e) = self.entry(o);
                inner.intern(&mut e);
                for k in &e.keys {
                    inner
                        .by_key
                        .entry(k.clone())
                        .or_default()
                        .insert(e.name.clone());
                }
                if let (Event::InitApply(_), Some(listed)) = (ev, inner.relist.as_mut()) {
                    let added = e.keys.clone();
                    let slot = listed.entry(oid).or_insert_with(|| (e.clone(), Vec::new()));
                    slot.0 = e;
                    slot.1.extend(added);
                }
            }
            Event::Delete(_) | Event::InitDone => {}
        }
    }

    /// Unindexes what `ev` removed; call after the reflector applied it.
    pub fn after(&self, ev: &Event<K>) {
        let mut inner = self.write();
        match ev {
            Event::Apply(o) => {
                let (oid, mut e) = self.entry(o);
                inner.intern(&mut e);
                let old = inner.of.insert(oid, e.clone());
                if let Some(old) = old {
                    inner.unindex(&old, &e.keys);
                }
            }
            Event::Delete(o) => {
                let (oid, _) = self.entry(o);
                if let Some(old) = inner.of.remove(&oid) {
                    inner.unindex(&old, &[]);
                }
            }
            Event::InitDone => {
                let listed = inner.relist.take().unwrap_or_default();
                let old = std::mem::take(&mut inner.of);
                for (oid, e) in old {
                    let keep = listed.get(&oid).map(|n| n.0.keys.as_slice()).unwrap_or(&[]);
                    inner.unindex(&e, keep);
                }
                let mut of = HashMap::with_capacity(listed.len());
                for (oid, (e, added)) in listed {
                    let stale = Entry {
                        name: e.name.clone(),
                        keys: added,
                    };
                    inner.unindex(&stale, &e.keys);
                    of.insert(oid, e);
                }
                inner.of = of;
            }
            Event::Init | Event::InitApply(_) => {}
        }
    }

    /// The objects of `store` in `ns` under `key`, sorted by name.
    pub fn find(&self, store: &Store<K>, ns: &str, key: &str) -> Vec<Arc<K>> {
        let names: Vec<Arc<str>> = {
            let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
            match inner.by_key.get(&id(ns, key)) {
                Some(names) => names.iter().cloned().collect(),
                None => return Vec::new(),
            }
        };
        let mut out: Vec<Arc<K>> = names
            .iter()
            .filter_map(|n| store.get(&ObjectRef::new(n).within(ns)))
            .filter(|o| (self.keys)(o).iter().any(|k| k == key))
            .collect();
        out.sort_by(|a, b| a.meta().name.cmp(&b.meta().name));
        out
    }

    /// How many keys the index holds (for tests and sizing).
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .len()
    }

    /// Whether the index holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Makes `e` share the strings the index already holds: its keys' (a workspace's key is
    /// the same for each of its sessions) and its name's (held once per key it is under and
    /// once in `of`).
    fn intern(&self, e: &mut Entry) {
        for k in &mut e.keys {
            if let Some((canon, names)) = self.by_key.get_key_value(k) {
                if let Some(n) = names.get(&e.name) {
                    e.name = n.clone();
                }
                *k = canon.clone();
            }
        }
    }

    /// Removes `e`'s name from its keys that are not in `keep`.
    fn unindex(&mut self, e: &Entry, keep: &[Id]) {
        for k in e.keys.iter().filter(|k| !keep.contains(k)) {
            if let Some(names) = self.by_key.get_mut(k) {
                names.remove(&e.name);
                if names.is_empty() {
                    self.by_key.remove(k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::reflector::store::Writer;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn cm(ns: &str, name: &str, key: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([("key".to_string(), key.to_string())])),
            ..ConfigMap::default()
        }
    }

    fn keys(c: &ConfigMap) -> Vec<String> {
        c.data
            .as_ref()
            .and_then(|d| d.get("key"))
            .into_iter()
            .flat_map(|k| k.split(',').map(str::to_string))
            .filter(|k| !k.is_empty())
            .collect()
    }

    const NS: [&str; 2] = ["a", "b"];
    const KEYS: [&str; 4] = ["x", "y", "x,y", ""];

    /// What a scan of the cache finds under `key` in `ns`, sorted by name.
    fn scan(store: &Store<ConfigMap>, ns: &str, key: &str) -> Vec<String> {
        let mut v: Vec<String> = store
            .state()
            .iter()
            .filter(|c| c.metadata.namespace.as_deref() == Some(ns))
            .filter(|c| keys(c).iter().any(|k| k == key))
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        v.sort();
        v
    }

    /// What the index names under `key` (before reading the cache): must cover the scan.
    fn named(index: &Index<ConfigMap>, ns: &str, key: &str) -> HashSet<String> {
        let inner = index.inner.read().unwrap();
        inner
            .by_key
            .get(&id(ns, key))
            .map(|s| s.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default()
    }

    fn check(index: &Index<ConfigMap>, store: &Store<ConfigMap>, step: &str) {
        for ns in NS {
            for key in ["x", "y"] {
                let scanned = scan(store, ns, key);
                let names = named(index, ns, key);
                for s in &scanned {
                    assert!(
                        names.contains(s),
                        "{step}: {ns}/{s} under {key} not indexed"
                    );
                }
                let found: Vec<String> = index
                    .find(store, ns, key)
                    .iter()
                    .map(|c| c.metadata.name.clone().unwrap())
                    .collect();
                assert_eq!(found, scanned, "{step}: lookup of {key} in {ns}");
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Apply(usize, usize, usize),
        Delete(usize, usize),
        Relist(Vec<(usize, usize, usize)>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let obj = (0..2usize, 0..5usize, 0..KEYS.len());
        prop_oneof![
            6 => obj.clone().prop_map(|(n, i, k)| Op::Apply(n, i, k)),
            3 => (0..2usize, 0..5usize).prop_map(|(n, i)| Op::Delete(n, i)),
            1 => proptest::collection::vec(obj, 0..8).prop_map(Op::Relist),
        ]
    }

    fn run(index: &Index<ConfigMap>, writer: &mut Writer<ConfigMap>, ev: Event<ConfigMap>) {
        let store = writer.as_reader();
        index.before(&ev);
        check(index, &store, "after before()");
        writer.apply_watcher_event(&ev);
        check(index, &store, "after the reflector");
        index.after(&ev);
        check(index, &store, "after after()");
    }

    proptest! {
        /// At every step of any sequence of watch events (changes of key, deletions, relists
        /// that drop and re-key objects), the index names every object the cache holds under a
        /// key, and a lookup finds exactly what a scan of the cache finds.
        #[test]
        fn lookups_match_a_scan_of_the_cache_at_every_step(ops in proptest::collection::vec(op(), 0..40)) {
            let index = Index::new(keys as Keys<ConfigMap>);
            let mut writer: Writer<ConfigMap> = Writer::default();
            let mk = |n: usize, i: usize, k: usize| cm(NS[n], &format!("o{i}"), KEYS[k]);
            for op in ops {
                match op {
                    Op::Apply(n, i, k) => run(&index, &mut writer, Event::Apply(mk(n, i, k))),
                    Op::Delete(n, i) => run(&index, &mut writer, Event::Delete(mk(n, i, 0))),
                    Op::Relist(objs) => {
                        run(&index, &mut writer, Event::Init);
                        for (n, i, k) in objs {
                            run(&index, &mut writer, Event::InitApply(mk(n, i, k)));
                        }
                        run(&index, &mut writer, Event::InitDone);
                    }
                }
            }
            // Nothing is left under a key once every object is gone.
            run(&index, &mut writer, Event::Init);
            run(&index, &mut writer, Event::InitDone);
            prop_assert!(index.is_empty());
        }
    }

    #[test]
    fn keys_and_names_are_held_once() {
        let index = Index::new(keys as Keys<ConfigMap>);
        let mut writer: Writer<ConfigMap> = Writer::default();
        for i in 0..3 {
            run(
                &index,
                &mut writer,
                Event::Apply(cm("a", &format!("s{i}"), "x,y")),
            );
        }
        run(&index, &mut writer, Event::Apply(cm("a", "s0", "x,y")));
        let inner = index.inner.read().unwrap();
        for e in inner.of.values() {
            for k in &e.keys {
                let (canon, names) = inner.by_key.get_key_value(k).unwrap();
                assert!(Arc::ptr_eq(k, canon), "the key's string is the index's");
                assert!(Arc::ptr_eq(&e.name, names.get(&e.name).unwrap()));
            }
        }
    }

    #[test]
    fn a_changed_key_moves_the_object_and_a_deletion_removes_it() {
        let index = Index::new(keys as Keys<ConfigMap>);
        let mut writer: Writer<ConfigMap> = Writer::default();
        let store = writer.as_reader();
        run(&index, &mut writer, Event::Apply(cm("a", "s1", "x")));
        run(&index, &mut writer, Event::Apply(cm("a", "s2", "x,y")));
        run(&index, &mut writer, Event::Apply(cm("b", "s1", "x")));
        let names = |ns: &str, k: &str| -> Vec<String> {
            index
                .find(&store, ns, k)
                .iter()
                .map(|c| c.metadata.name.clone().unwrap())
                .collect()
        };
        assert_eq!(names("a", "x"), ["s1", "s2"]);
        assert_eq!(names("a", "y"), ["s2"]);
        assert_eq!(names("b", "x"), ["s1"]);
        run(&index, &mut writer, Event::Apply(cm("a", "s1", "y")));
        assert_eq!(names("a", "x"), ["s2"]);
        assert_eq!(names("a", "y"), ["s1", "s2"]);
        run(&index, &mut writer, Event::Delete(cm("a", "s2", "")));
        assert_eq!(names("a", "x"), Vec::<String>::new());
        assert_eq!(names("a", "y"), ["s1"]);
    }
}
