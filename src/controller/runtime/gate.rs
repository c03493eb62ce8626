//! A gate in front of each controller's triggers, so that a wave of them (the first list, a
//! relist, a burst of launches, a Group change that maps to every session of a namespace) waits
//! in a queue of ours instead of kube's scheduler.
//!
//! kube's scheduler takes every trigger the moment it arrives: a wave of 10,000 puts 10,000
//! entries in its `HashMap`, `DelayQueue` and pending set, and those tables keep their capacity
//! once drained (about 5 MB per wave of 10,000 per controller, seen in a heaptrack profile).
//! The gate hands kube at most a few times the controller's concurrency at a time, and releases
//! the next trigger when the controller reports a reconcile done (its output stream, read by
//! [`Gate::settle`]). What waits meanwhile is queued here, deduplicated, in tables that are
//! dropped once the wave has drained.
//!
//! What kube's scheduler did, the gate keeps: a trigger for an object already waiting is merged
//! with it, and a trigger for an object being reconciled (released, not yet done) is not lost
//! but released again once that reconcile is done, so every change is seen by a reconcile that
//! starts after it. Requeues a reconcile asks for (`Action::requeue`, the error policy's
//! backoff) still go to kube's scheduler, one entry per object, as before.
//!
//! The accounting cannot stall the controller: a released trigger that kube merged with a
//! requeue of the same object is reported done with it; one never reported (which should not
//! happen) stops counting after [`STALL`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::fmt::Debug;
use std::future::Future as _;

use futures::stream::{self, BoxStream, Fuse};
use futures::{Stream, StreamExt, TryFuture};
use kube::Resource;
use kube::runtime::controller::{Action, Config, Controller, Error};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;
use tokio::time::{Instant, Sleep};

/// How long a released trigger counts against the limit without being reported done.
pub const STALL: Duration = Duration::from_secs(300);

/// Triggers released to kube at a time per unit of concurrency: enough that kube always has the
/// next one at hand when a reconcile finishes.
const PER_SLOT: usize = 2;

/// Queue capacity kept after a wave has drained; above it the tables are dropped.
const KEEP: usize = 256;

/// The shared half: what is queued, what is out.
struct State<K: Resource<DynamicType = ()>> {
    /// Waiting, in arrival order (each also in `queued`).
    order: VecDeque<ObjectRef<K>>,
    queued: HashSet<ObjectRef<K>>,
    /// Released to kube, not yet reported done.
    out: HashMap<ObjectRef<K>, Out>,
    /// The gated stream's task, parked at the limit.
    waker: Option<Waker>,
    /// Where the number waiting is shown.
    depth: Gauge,
}

struct Out {
    since: Instant,
    /// Triggered again while out: queue it again when done.
    again: bool,
}

impl<K: Resource<DynamicType = ()>> State<K> {
    fn enqueue(&mut self, r: ObjectRef<K>) {
        if let Some(o) = self.out.get_mut(&r) {
            o.again = true;
        } else if self.queued.insert(r.clone()) {
            self.order.push_back(r);
            self.depth.inc();
        }
    }

    fn release(&mut self, now: Instant) -> Option<ObjectRef<K>> {
        let r = self.order.pop_front()?;
        self.queued.remove(&r);
        self.depth.dec();
        if self.order.is_empty() && self.queued.capacity() > KEEP {
            self.order = VecDeque::new();
            self.queued = HashSet::new();
        }
        self.out.insert(
            r.clone(),
            Out {
                since: now,
                again: false,
            },
        );
        Some(r)
    }

    fn done(&mut self, r: &ObjectRef<K>) -> bool {
        match self.out.remove(r) {
            Some(o) => {
                if o.again {
                    self.enqueue(r.clone());
                }
                true
            }
            None => false,
        }
    }

    /// Stops counting what has been out for [`STALL`]; returns when the next one would.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        let stalled: Vec<_> = self
            .out
            .iter()
            .filter(|(_, o)| now.duration_since(o.since) >= STALL)
            .map(|(r, _)| r.clone())
            .collect();
        for r in &stalled {
            tracing::warn!(object = %r, "a reconcile was not reported done; no longer counted");
            self.done(r);
        }
        self.out.values().map(|o| o.since + STALL).min()
    }
}

/// One controller's gate: [`Gate::stream`] feeds the controller, [`Gate::settle`] reads what it
/// reports.
pub struct Gate<K: Resource<DynamicType = ()>> {
    state: Arc<Mutex<State<K>>>,
    limit: usize,
}

impl<K: Resource<DynamicType = ()>> Clone for Gate<K> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
            limit: self.limit,
        }
    }
}

/// The trigger a controller sees for `r`: its name and namespace only (kube's references also
/// carry the object's resourceVersion and uid, which the scheduler neither hashes nor needs).
pub fn key<K: Resource<DynamicType = ()>>(r: &ObjectRef<K>) -> ObjectRef<K> {
    named(&r.name, r.namespace.as_deref())
}

/// The trigger for the object `name` in `ns`.
fn named<K: Resource<DynamicType = ()>>(name: &str, ns: Option<&str>) -> ObjectRef<K> {
    let k = ObjectRef::new(name);
    match ns {
        Some(ns) => k.within(ns),
        None => k,
    }
}

impl<K: Resource<DynamicType = ()>> Gate<K> {
    /// A gate for a controller running `concurrency` reconciles at a time (0: unlimited, and
    /// so is the gate), showing how many wait in `depth`.
    pub fn new(concurrency: u16, depth: Gauge) -> Self {
        depth.set(0);
        Self {
            state: Arc::new(Mutex::new(State {
                order: VecDeque::new(),
                queued: HashSet::new(),
                out: HashMap::new(),
                waker: None,
                depth,
            })),
            limit: match usize::from(concurrency) {
                0 => usize::MAX,
                c => c.saturating_mul(PER_SLOT),
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The controller's trigger stream: everything `inputs` names, released at most
    /// the limit at a time. Ends when `inputs` ends and nothing is left queued.
    pub fn stream(&self, inputs: BoxStream<'static, ObjectRef<K>>) -> Gated<K> {
        Gated {
            gate: self.clone(),
            inputs: inputs.fuse(),
            timer: None,
        }
    }

    /// Records that a reconcile of `r` is done (whatever its outcome), releasing the next.
    pub fn done(&self, r: &ObjectRef<K>) {
        let mut st = self.lock();
        if st.done(&key(r))
            && let Some(w) = st.waker.take()
        {
            w.wake();
        }
    }

    /// Reads one item of the controller's output: a reconcile done, or an object it could not
    /// find (deleted meanwhile), is [`Gate::done`]; other errors (the trigger streams', the
    /// runner's) name no object.
    pub fn settle<E, Q>(&self, res: &Result<(ObjectRef<K>, Action), Error<E, Q>>) {
        match res {
            Ok((r, _)) => self.done(r),
            Err(Error::ObjectNotFound(r) | Error::ReconcilerFailed(_, r)) => {
                self.done(&named(&r.name, r.namespace.as_deref()));
            }
            Err(_) => {}
        }
    }

    /// Triggers waiting and out (for tests).
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.order.len(), st.out.len())
    }
}

/// The gated trigger stream of [`Gate::stream`].
pub struct Gated<K: Resource<DynamicType = ()>> {
    gate: Gate<K>,
    inputs: Fuse<BoxStream<'static, ObjectRef<K>>>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<K: Resource<DynamicType = ()>> Stream for Gated<K> {
    type Item = ObjectRef<K>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Take in everything that has arrived, so the watches never wait for the controller.
        let mut ended = false;
        let mut arrived = Vec::new();
        loop {
            match this.inputs.poll_next_unpin(cx) {
                Poll::Ready(Some(r)) => arrived.push(key(&r)),
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        let mut st = this.gate.lock();
        for r in arrived {
            st.enqueue(r);
        }
        let now = Instant::now();
        if st.out.len() >= this.gate.limit && !st.order.is_empty() {
            if let Some(next) = st.expire(now) {
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
                timer.as_mut().reset(next);
                if timer.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
            }
        } else {
            this.timer = None;
        }
        if st.out.len() < this.gate.limit
            && let Some(r) = st.release(now)
        {
            return Poll::Ready(Some(r));
        }
        if ended && st.order.is_empty() {
            return Poll::Ready(None);
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A controller's triggers being gathered: streams of the objects to reconcile, from its own
/// kind's changes and from mappings of other kinds'. [`Inputs::run`] runs the controller behind a
/// [`Gate`].
pub struct Inputs<K: Resource<DynamicType = ()>> {
    streams: Vec<BoxStream<'static, ObjectRef<K>>>,
}

impl<K> Default for Inputs<K>
where
    K: Resource<DynamicType = ()>,
{
    fn default() -> Self {
        Self {
            streams: Vec::new(),
        }
    }
}

impl<K> Inputs<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Reconciles every object of `changes` (the controller's own kind).
    pub fn own(self, changes: impl Stream<Item = Arc<K>> + Send + 'static) -> Self {
        self.refs(changes.map(|o| of(o.as_ref())))
    }

    /// Reconciles what `map` names for each object of `changes`.
    pub fn map<O, I, F>(self, changes: impl Stream<Item = Arc<O>> + Send + 'static, map: F) -> Self
    where
        I: IntoIterator<Item = ObjectRef<K>> + 'static,
        I::IntoIter: Send,
        F: Fn(Arc<O>) -> I + Send + 'static,
    {
        self.refs(changes.flat_map(move |o| stream::iter(map(o))))
    }

    /// Reconciles every reference of `refs`.
    pub fn refs(mut self, refs: impl Stream<Item = ObjectRef<K>> + Send + 'static) -> Self {
        self.streams.push(refs.boxed());
        self
    }

    /// Runs the controller over `reader`'s objects, `concurrency` reconciles at a time, fed
    /// through a [`Gate`] that its output settles and whose waiting objects `depth` counts.
    /// Polled like kube's [`Controller::run`].
    pub fn run<Fut, Ctx>(
        self,
        reader: Store<K>,
        concurrency: u16,
        depth: Gauge,
        reconciler: impl FnMut(Arc<K>, Arc<Ctx>) -> Fut,
        error_policy: impl Fn(Arc<K>, &Fut::Error, Arc<Ctx>) -> Action,
        context: Arc<Ctx>,
    ) -> impl Stream<Item = Result<(ObjectRef<K>, Action), Error<Fut::Error, watcher::Error>>>
    where
        Fut: TryFuture<Ok = Action> + Send + 'static,
        Fut::Error: std::error::Error + Send + 'static,
    {
        let gate = Gate::new(concurrency, depth);
        let triggers = gate.stream(stream::select_all(self.streams).boxed());
        // The controller's own-kind trigger is part of `triggers`: kube's is left empty.
        Controller::for_shared_stream(stream::pending(), reader)
            .reconcile_on(triggers)
            .with_config(Config::default().concurrency(concurrency))
            .run(reconciler, error_policy, context)
            .inspect(move |res| gate.settle(res))
    }
}

/// The trigger for `o`.
pub fn of<K: Resource<DynamicType = ()>>(o: &K) -> ObjectRef<K> {
    named(
        o.meta().name.as_deref().unwrap_or_default(),
        o.meta().namespace.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::v1alpha1::Session;
    use futures::channel::mpsc;
    use futures::poll;

    fn r(name: &str) -> ObjectRef<Session> {
        ObjectRef::new(name).within("ns")
    }

    type Err = Error<std::io::Error, std::io::Error>;

    fn ok(name: &str) -> Result<(ObjectRef<Session>, Action), Err> {
        Ok((r(name), Action::await_change()))
    }

    #[tokio::test]
    async fn releases_at_most_the_limit_and_the_next_when_one_is_done() {
        let depth = Gauge::default();
        let gate = Gate::<Session>::new(2, depth.clone());
        let (tx, rx) = mpsc::unbounded();
        for i in 0..10 {
            tx.unbounded_send(r(&format!("s{i}"))).unwrap();
        }
        let mut s = gate.stream(rx.boxed());
        let mut got = Vec::new();
        while let Poll::Ready(Some(x)) = poll!(s.next()) {
            got.push(x.name);
        }
        assert_eq!(
            got,
            ["s0", "s1", "s2", "s3"],
            "limit is 2 per slot x 2 slots"
        );
        assert_eq!(gate.counts(), (6, 4));
        assert_eq!(depth.get(), 6, "the gauge shows what waits");
        gate.settle(&ok("s1"));
        assert_eq!(poll!(s.next()), Poll::Ready(Some(r("s4"))));
        assert!(poll!(s.next()).is_pending());
        // A reconcile that failed, or found its object gone, is done as well.
        gate.settle(&Result::<_, Err>::Err(Error::ReconcilerFailed(
            std::io::Error::other("x"),
            Box::new(r("s0").erase()),
        )));
        gate.settle(&Result::<_, Err>::Err(Error::ObjectNotFound(Box::new(
            r("s2").erase(),
        ))));
        assert_eq!(poll!(s.next()), Poll::Ready(Some(r("s5"))));
        assert_eq!(poll!(s.next()), Poll::Ready(Some(r("s6"))));
        assert!(poll!(s.next()).is_pending());
        // Reports for what is not out (a requeue kube ran by itself) change nothing.
        gate.settle(&ok("s9"));
        assert!(poll!(s.next()).is_pending());
        assert_eq!(gate.counts(), (3, 4));
        assert_eq!(depth.get(), 3);
    }

    #[tokio::test]
    async fn merges_waiting_triggers_and_requeues_one_that_came_while_out() {
        let gate = Gate::<Session>::new(1, Gauge::default());
        let (tx, rx) = mpsc::unbounded();
        let mut s = gate.stream(rx.boxed());
        for n in ["a", "b", "a", "b", "a"] {
            tx.unbounded_send(r(n)).unwrap();
        }
        assert_eq!(poll!(s.next()), Poll::Ready(Some(r("a"))));
        assert_eq!(poll!(s.next()), Poll::Ready(Some(r("b"))));
        assert!(poll!(s.next()).is_pending());
        assert_eq!(
            gate.counts(),
            (0, 2),
            "the repeats merged with what was waiting"
        );
        // `a` changes while it is being reconciled: once done, it is released again.
        tx.unbounded_send(r("a")).unwrap();
        assert!(poll!(s.next()).is_pending());
        gate.done(&r("b"));
        assert!(
            poll!(s.next()).is_pending(),
            "b is done and nothing else waits"
        );
        gate.done(&r("a"));
        assert_eq!(poll!(s.next()), Poll::Ready(Some(r("a"))));
        // The resourceVersion and uid a reference may carry are not part of the trigger.
        let mut with_extra = r("c");
        with_extra.extra.resource_version = Some("7".into());
        with_extra.extra.uid = Some("u".into());
        tx.unbounded_send(with_extra).unwrap();
        tx.unbounded_send(r("c")).unwrap();
        let c = poll!(s.next());
        assert_eq!(c, Poll::Ready(Some(r("c"))));
        if let Poll::Ready(Some(c)) = c {
            assert_eq!(c.extra.resource_version, None);
        }
        assert!(poll!(s.next()).is_pending(), "the two c's were one trigger");
        gate.done(&r("a"));
        // The end: nothing can trigger again, and kube finishes what is out.
        drop(tx);
        assert_eq!(poll!(s.next()), Poll::Ready(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trigger_never_reported_done_stops_counting_after_the_stall_time() {
        let gate = Gate::<Session>::new(1, Gauge::default());
        let (tx, rx) = mpsc::unbounded();
        let mut s = gate.stream(rx.boxed());
        for n in ["a", "b", "c"] {
            tx.unbounded_send(r(n)).unwrap();
        }
        assert_eq!(s.next().await, Some(r("a")));
        assert_eq!(s.next().await, Some(r("b")));
        let start = Instant::now();
        assert_eq!(s.next().await, Some(r("c")));
        assert!(
            Instant::now() - start >= STALL,
            "released only once a or b stalled"
        );
    }

    #[tokio::test]
    async fn the_tables_are_dropped_once_a_wave_has_drained() {
        let gate = Gate::<Session>::new(0, Gauge::default());
        let (tx, rx) = mpsc::unbounded();
        for i in 0..5000 {
            tx.unbounded_send(r(&format!("s{i}"))).unwrap();
        }
        let mut s = gate.stream(rx.boxed());
        let mut n = 0;
        while let Poll::Ready(Some(_)) = poll!(s.next()) {
            n += 1;
        }
        assert_eq!(n, 5000);
        let st = gate.lock();
        assert!(st.queued.capacity() <= KEEP && st.order.capacity() <= KEEP);
    }
}
