//! Two (then three) replicas of the real binary with leader election on a Lease: exactly one
//! leads, sessions get exactly one pod each, a killed leader is replaced within the lease
//! duration with no duplicate pods, and a leader stopped with SIGTERM hands over at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cubicle::crd::v1alpha1::SessionPhase;
use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::api::install_crds;
use crate::binary::OperatorBin;
use crate::sessions::{create, session, tenant, wait_phase};
use crate::support::{self, TestNs, wait_for};

const LEASE: &str = "cubicle-leader";
const LEASE_DURATION: Duration = Duration::from_secs(4);

/// Every pod of the namespace seen by a watch, by owning session: the pod UIDs alive at once
/// (the most ever) and every UID ever seen.
#[derive(Default)]
struct PodLedger {
    live: BTreeMap<String, BTreeSet<String>>,
    max_live: BTreeMap<String, usize>,
    ever: BTreeMap<String, BTreeSet<String>>,
}

fn owner_session(p: &Pod) -> Option<String> {
    p.owner_references()
        .iter()
        .find(|o| o.kind == "Session")
        .map(|o| o.name.clone())
}

impl PodLedger {
    fn seen(&mut self, p: &Pod, alive: bool) {
        let (Some(s), Some(uid)) = (owner_session(p), p.uid()) else {
            return;
        };
        let live = self.live.entry(s.clone()).or_default();
        if alive {
            live.insert(uid.clone());
        } else {
            live.remove(&uid);
        }
        let n = live.len();
        let max = self.max_live.entry(s.clone()).or_default();
        *max = (*max).max(n);
        self.ever.entry(s).or_default().insert(uid);
    }
}

fn replica(name: &str, ns: &str) -> OperatorBin {
    let args: Vec<String> = [
        "--leader-elect",
        "--lease-duration=4s",
        "--renew-deadline=3s",
        "--retry-period=500ms",
        &format!("--identity={name}"),
        &format!("--leader-election-namespace={ns}"),
        &format!("--namespace={ns}"),
    ]
    .map(String::from)
    .to_vec();
    OperatorBin::spawn(&format!("ha-{name}"), support::kubeconfig(), &args, &[])
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

#[tokio::test]
async fn one_leader_writes_and_a_standby_takes_over_without_duplicate_pods() {
    install_crds().await;
    let ns = TestNs::new("ha").await;
    tenant(&ns).await;
    let leases: Api<Lease> = ns.api();

    // Watch every pod of the namespace for the whole test.
    let ledger = Arc::new(Mutex::new(PodLedger::default()));
    let pods: Api<Pod> = ns.api();
    let l = ledger.clone();
    let pod_watch = tokio::spawn(async move {
        let mut events = Box::pin(watcher(pods, watcher::Config::default()));
        while let Ok(Some(e)) = events.try_next().await {
            let mut l = l.lock().unwrap();
            match e {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => l.seen(&p, true),
                watcher::Event::Delete(p) => l.seen(&p, false),
                _ => {}
            }
        }
    });

    let mut replicas: BTreeMap<String, OperatorBin> = ["a", "b"]
        .into_iter()
        .map(|n| (n.to_string(), replica(n, &ns.name)))
        .collect();
    let first = wait_for("a Lease holder", Duration::from_secs(30), || {
        holder(&leases)
    })
    .await;
    assert!(replicas.contains_key(&first), "holder {first}");
    let standby = if first == "a" { "b" } else { "a" }.to_string();
    replicas[&first]
        .wait_logged("caches synced", Duration::from_secs(30))
        .await;
    for r in replicas.values_mut() {
        r.wait_ready(Duration::from_secs(30)).await;
    }
    // The standby stays a standby while the leader renews.
    tokio::time::sleep(LEASE_DURATION + Duration::from_secs(1)).await;
    assert_eq!(holder(&leases).await.as_deref(), Some(first.as_str()));
    assert!(replicas[&standby].logged("standing by for leadership"));
    assert!(!replicas[&standby].logged("acquired leadership"));
    assert!(!replicas[&standby].logged("caches synced"));

    let before = ["alice-1", "bob-1", "bob-2"];
    for (name, user) in [("alice-1", "alice"), ("bob-1", "bob"), ("bob-2", "bob")] {
        create(&ns, &session(name, user, "desktop", json!({}))).await;
    }
    for name in before {
        wait_phase(&ns, name, SessionPhase::Running).await;
    }

    // Kill the leader outright: it cannot hand over, so the standby waits out the lease.
    let killed = Instant::now();
    replicas[&first].signal("KILL");
    create(&ns, &session("alice-2", "alice", "desktop", json!({}))).await;
    let new_holder = wait_for(
        "the standby to hold the Lease",
        LEASE_DURATION + Duration::from_secs(10),
        || async {
            holder(&leases)
                .await
                .filter(|h| *h == standby)
                .map(|_| killed.elapsed())
        },
    )
    .await;
    wait_phase(&ns, "alice-2", SessionPhase::Running).await;
    let new_running = killed.elapsed();
    eprintln!(
        "[ha] takeover: {} ms (leader SIGKILLed to Lease held by the standby; lease duration {} ms, retry 500 ms); a session created at the kill Running after {} ms",
        new_holder.as_millis(),
        LEASE_DURATION.as_millis(),
        new_running.as_millis()
    );
    assert!(
        new_holder <= LEASE_DURATION + Duration::from_secs(3),
        "takeover took {new_holder:?}, more than the lease duration plus 3 s"
    );
    assert!(replicas[&standby].logged("acquired leadership"));
    let lease = leases.get(LEASE).await.unwrap().spec.unwrap();
    assert!(lease.lease_transitions.unwrap_or(0) >= 1, "{lease:?}");

    // A third replica stands by; the leader stopped with SIGTERM releases the Lease, so the
    // handover takes about one retry period instead of a lease duration.
    replicas.insert("c".into(), replica("c", &ns.name));
    replicas
        .get_mut("c")
        .unwrap()
        .wait_ready(Duration::from_secs(30))
        .await;
    replicas["c"]
        .wait_logged("standing by for leadership", Duration::from_secs(10))
        .await;
    let termed = Instant::now();
    replicas[&standby].signal("TERM");
    let status = replicas
        .get_mut(&standby)
        .unwrap()
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the leader exits within 5 s of SIGTERM");
    assert!(status.success(), "{status}");
    assert!(replicas[&standby].logged("released the lease"));
    let handover = wait_for(
        "replica c to hold the Lease",
        LEASE_DURATION + Duration::from_secs(10),
        || async {
            holder(&leases)
                .await
                .filter(|h| h == "c")
                .map(|_| termed.elapsed())
        },
    )
    .await;
    create(&ns, &session("erin-1", "erin", "desktop", json!({}))).await;
    wait_phase(&ns, "erin-1", SessionPhase::Running).await;
    eprintln!(
        "[ha] graceful handover: {} ms (SIGTERM to the leader until the standby holds the Lease)",
        handover.as_millis()
    );
    assert!(
        handover < LEASE_DURATION,
        "a released lease is taken within a retry period, not a lease duration: {handover:?}"
    );

    // Let the pod watch catch up, then check: one pod per session, never two at once, and the
    // sessions that ran before the kill kept their pod (no re-creation by the new leader).
    tokio::time::sleep(Duration::from_secs(1)).await;
    pod_watch.abort();
    let l = ledger.lock().unwrap();
    for name in ["alice-1", "bob-1", "bob-2", "alice-2", "erin-1"] {
        assert_eq!(
            l.max_live.get(name).copied(),
            Some(1),
            "{name}: pods alive at once"
        );
        assert_eq!(
            l.ever.get(name).map(BTreeSet::len),
            Some(1),
            "{name}: pods ever created: {:?}",
            l.ever.get(name)
        );
    }
    assert!(
        l.max_live.values().all(|n| *n <= 1),
        "a session had two pods at once: {:?}",
        l.max_live
    );
}
