//! The status controllers (User, Group, Workspace, Server, ServerPool, ServerAssignment) on the real
//! control plane: provenance in User status, precise updates when one Group changes, deletions,
//! assignment views, foreign status fields left alone, and no writes in a steady state.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use cubicle::apicount::ApiCounter;
use cubicle::client::{self, ApiBudget};
use cubicle::controller::{self, OperatorConfig};
use cubicle::crd::v1alpha1::*;
use cubicle::metrics::Metrics;
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::api::install_crds;
use crate::support::{self, TestNs, wait_for};

const LONG: Duration = Duration::from_secs(60);

/// The status controllers of one namespace, running in this process, with a request counter.
struct StatusOperator {
    counter: ApiCounter,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl StatusOperator {
    async fn start(namespace: &str) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let kc = Kubeconfig::read_from(support::kubeconfig()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("config");
        let counter = ApiCounter::default();
        let client = client::build(config, counter.clone(), ApiBudget::UNLIMITED).expect("client");
        let cfg = OperatorConfig {
            namespaces: vec![namespace.to_string()],
            identity: format!("e2e-status-{namespace}"),
            ..OperatorConfig::default()
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            controller::run(
                client,
                cfg,
                Arc::new(Metrics::default()),
                controller::STATUS,
                Arc::new(AtomicBool::new(false)),
                None,
                async {
                    let _ = rx.await;
                },
            )
            .await
        });
        Self {
            counter,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }

    /// Waits until the operator has made no write for `quiet`, then returns its write count.
    async fn settle(&self, quiet: Duration) -> u64 {
        let mut last = self.counter.writes();
        let deadline = tokio::time::Instant::now() + LONG;
        loop {
            tokio::time::sleep(quiet).await;
            let now = self.counter.writes();
            if now == last {
                return now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the status controllers never stopped writing: {:?}",
                self.counter.snapshot()
            );
            last = now;
        }
    }
}

impl Drop for StatusOperator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn apply(ns: &TestNs, doc: Value) {
    let kind = doc["kind"].as_str().unwrap().to_string();
    let name = doc["metadata"]["name"].as_str().unwrap().to_string();
    let pp = PatchParams::apply("cubicle-e2e").force();
    let r = match kind.as_str() {
        "User" => ns
            .api::<User>()
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map(|_| ()),
        "Group" => ns
            .api::<Group>()
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map(|_| ()),
        "ServerPool" => ns
            .api::<ServerPool>()
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map(|_| ()),
        "Server" => ns
            .api::<Server>()
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map(|_| ()),
        "ServerAssignment" => ns
            .api::<ServerAssignment>()
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map(|_| ()),
        "Workspace" => ns
            .api::<Workspace>()
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map(|_| ()),
        other => panic!("unexpected kind {other}"),
    };
    r.unwrap_or_else(|e| panic!("apply {kind}/{name}: {e}"));
}

fn group(name: &str, priority: u32, settings: Value) -> Value {
    json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Group",
        "metadata": {"name": name},
        "spec": {"priority": priority, "settings": settings}
    })
}

fn user(name: &str, realm: &str, groups: &[&str]) -> Value {
    json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
        "metadata": {"name": name},
        "spec": {"realm": realm, "groups": groups}
    })
}

fn setting<'a>(s: &'a UserStatus, name: &str) -> &'a EffectiveSetting {
    s.effective_settings
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no effective setting {name} in {s:?}"))
}

fn condition<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conds.iter().find(|c| c.type_ == t)
}

/// Waits until `name`'s status satisfies `check`, and returns the User.
async fn user_until(
    ns: &TestNs,
    name: &str,
    what: &str,
    check: impl Fn(&UserStatus) -> bool,
) -> User {
    let api = ns.api::<User>();
    wait_for(&format!("User/{name}: {what}"), LONG, || async {
        let u = api.get(name).await.ok()?;
        let s = u.status.as_ref()?;
        check(s).then_some(u)
    })
    .await
}

fn source_is(s: &UserStatus, setting_name: &str, value: Value, group: &str, priority: u32) -> bool {
    s.effective_settings.iter().any(|r| {
        r.name == setting_name
            && r.value.as_ref() == Some(&value)
            && r.source.group.as_deref() == Some(group)
            && r.source.priority == Some(priority)
    })
}

#[tokio::test]
async fn one_group_change_updates_exactly_its_members_with_provenance() {
    install_crds().await;
    let ns = TestNs::new("status-users").await;
    let op = StatusOperator::start(&ns.name).await;

    apply(
        &ns,
        group(
            "all-users",
            100,
            json!({"autoAddLocalUsers": true, "keepaliveInterval": "5m", "keepaliveExpiration": "1h",
                   "maxKasmsPerUser": 1}),
        ),
    )
    .await;
    apply(
        &ns,
        group(
            "eng",
            10,
            json!({"keepaliveExpiration": "2h", "maxKasmsPerUser": 5,
                   "controlPanel": {"advancedSettings": {"showGameMode": false}},
                   "volumeMappings": [{"name": "data", "mountPath": "/data", "source": {"emptyDir": {}}}]}),
        ),
    )
    .await;
    apply(
        &ns,
        group(
            "ops",
            20,
            json!({"maxKasmsPerUser": 3,
                   "volumeMappings": [{"name": "logs", "mountPath": "/logs", "source": {"emptyDir": {}}}]}),
        ),
    )
    .await;
    apply(&ns, user("alice", "local", &["eng"])).await;
    apply(&ns, user("bob", "local", &["eng", "ops"])).await;
    apply(&ns, user("carol", "ldap", &["ops"])).await;

    // Provenance: the group and its priority, merged lists, defaults; the auto-added group.
    let alice = user_until(&ns, "alice", "resolved with eng and all-users", |s| {
        s.effective_groups.len() == 2 && source_is(s, "keepaliveExpiration", json!("2h"), "eng", 10)
    })
    .await;
    let s = alice.status.as_ref().unwrap();
    assert_eq!(
        s.effective_groups
            .iter()
            .map(|g| (g.name.as_str(), g.priority, g.via))
            .collect::<Vec<_>>(),
        vec![
            ("eng", 10, MembershipVia::Spec),
            ("all-users", 100, MembershipVia::AutoAddLocalUsers)
        ]
    );
    assert!(source_is(s, "maxKasmsPerUser", json!(5), "eng", 10));
    assert!(source_is(
        s,
        "keepaliveInterval",
        json!("5m"),
        "all-users",
        100
    ));
    assert!(source_is(
        s,
        "controlPanel.advancedSettings.showGameMode",
        json!(false),
        "eng",
        10
    ));
    let idle = setting(s, "idleDisconnect");
    assert_eq!(idle.value, Some(json!("20m")));
    assert_eq!(idle.source.default, Some(true));
    assert_eq!(setting(s, "sessionTimeLimit").value, None);
    assert!(s.user_id.as_deref().is_some_and(|id| id.len() == 36));
    assert_eq!(s.observed_generation, alice.metadata.generation);
    let ready = condition(&s.conditions, "Ready").expect("Ready");
    assert_eq!(ready.status, "True");
    assert_eq!(ready.observed_generation, alice.metadata.generation);

    let bob = user_until(&ns, "bob", "merged volumes", |s| {
        setting(s, "volumeMappings").source.merged == vec!["eng".to_string(), "ops".to_string()]
    })
    .await;
    let carol = user_until(&ns, "carol", "ops only (ldap: not auto-added)", |s| {
        s.effective_groups.len() == 1 && source_is(s, "maxKasmsPerUser", json!(3), "ops", 20)
    })
    .await;
    assert_eq!(
        setting(carol.status.as_ref().unwrap(), "keepaliveExpiration")
            .source
            .default,
        Some(true)
    );
    let groups = ns.api::<Group>();
    wait_for("Group/eng members", LONG, || async {
        let g = groups.get("eng").await.ok()?;
        (g.status?.members == vec!["alice", "bob"]).then_some(())
    })
    .await;
    wait_for("Group/all-users members (local users)", LONG, || async {
        let g = groups.get("all-users").await.ok()?;
        let s = g.status?;
        (s.members == vec!["alice", "bob"] && s.member_count == Some(2)).then_some(())
    })
    .await;

    // Another writer's status field (the usage ledger) must survive our applies.
    ns.api::<User>()
        .patch_status(
            "alice",
            &PatchParams::apply("cubicle-e2e-ledger").force(),
            &Patch::Apply(json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
                "status": {"usage": [{"scope": "perUser", "interval": "daily",
                                      "usedSeconds": 60, "limitSeconds": 3600}]}
            })),
        )
        .await
        .expect("apply usage");

    op.settle(Duration::from_secs(3)).await;
    let before = op.counter.snapshot();
    let carol_rv = ns
        .api::<User>()
        .get("carol")
        .await
        .unwrap()
        .resource_version();
    let bob_rv_before = bob.resource_version();

    // Edit one setting of one group: every member changes, with provenance; no one else does.
    ns.api::<Group>()
        .patch(
            "eng",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"settings": {"keepaliveExpiration": "3h"}}})),
        )
        .await
        .unwrap();
    let alice = user_until(&ns, "alice", "keepaliveExpiration 3h from eng", |s| {
        source_is(s, "keepaliveExpiration", json!("3h"), "eng", 10)
    })
    .await;
    let bob = user_until(&ns, "bob", "keepaliveExpiration 3h from eng", |s| {
        source_is(s, "keepaliveExpiration", json!("3h"), "eng", 10)
    })
    .await;
    assert_ne!(bob.resource_version(), bob_rv_before);
    assert_eq!(
        alice.status.as_ref().unwrap().usage.len(),
        1,
        "the ledger's usage is left alone"
    );
    let after = op.settle(Duration::from_secs(3)).await;
    assert_eq!(
        ns.api::<User>()
            .get("carol")
            .await
            .unwrap()
            .resource_version(),
        carol_rv,
        "a user outside the group is not rewritten"
    );
    // Exactly the two members' statuses were written, and Group/eng's (its observedGeneration).
    let written = |resource: &str| {
        let key = |m: &std::collections::BTreeMap<cubicle::apicount::RequestKey, u64>| {
            m.iter()
                .filter(|(k, _)| k.is_write() && k.resource == resource)
                .map(|(_, v)| *v)
                .sum::<u64>()
        };
        key(&op.counter.snapshot()) - key(&before)
    };
    assert_eq!(written("users/status"), 2, "{:?}", op.counter.snapshot());
    assert_eq!(written("groups/status"), 1, "{:?}", op.counter.snapshot());

    // Steady state: no writes at all over a quiet period.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        op.counter.writes(),
        after,
        "steady state wrote: {:?}",
        op.counter.snapshot()
    );

    // Deleting a group updates its members (deletions are triggers too).
    ns.api::<Group>()
        .delete("ops", &DeleteParams::default())
        .await
        .unwrap();
    user_until(&ns, "bob", "ops gone", |s| {
        s.effective_groups.iter().all(|g| g.name != "ops")
            && source_is(s, "maxKasmsPerUser", json!(5), "eng", 10)
    })
    .await;
    user_until(&ns, "carol", "no groups left", |s| {
        s.effective_groups.is_empty() && setting(s, "maxKasmsPerUser").source.default == Some(true)
    })
    .await;

    // An unknown group and a tie show in conditions.
    apply(&ns, group("eng2", 10, json!({"maxKasmsPerUser": 7}))).await;
    apply(&ns, user("alice", "local", &["eng", "eng2", "nope"])).await;
    user_until(
        &ns,
        "alice",
        "conditions report the tie and the unknown group",
        |s| {
            let ready = condition(&s.conditions, "Ready");
            let conflict = condition(&s.conditions, "SettingsConflict");
            ready.is_some_and(|c| {
                c.status == "False"
                    && c.reason == "UnknownGroup"
                    && c.message.contains("Group/nope")
            }) && conflict.is_some_and(|c| c.status == "True" && c.reason == "PriorityTie")
        },
    )
    .await;
    op.stop().await;
}

#[tokio::test]
async fn assignment_views_follow_the_pool_setting() {
    install_crds().await;
    let ns = TestNs::new("status-servers").await;
    let op = StatusOperator::start(&ns.name).await;
    let node0 = support::env().nodes[0].clone();
    let node1 = support::env().nodes[1].clone();
    let pool = |name: &str, enabled: bool| {
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerPool",
               "metadata": {"name": name}, "spec": {"assignmentEnabled": enabled}})
    };
    apply(&ns, pool("dedicated", true)).await;
    apply(&ns, pool("shared", false)).await;
    let server = |name: &str, pool: &str, node: &str, max: u32| {
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Server",
               "metadata": {"name": name},
               "spec": {"pool": pool, "nodeName": node, "maxSessions": max}})
    };
    apply(&ns, server("ws-01", "dedicated", &node0, 4)).await;
    apply(&ns, server("ws-03", "shared", &node1, 2)).await;
    apply(&ns, user("alice", "local", &[])).await;
    apply(
        &ns,
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerAssignment",
               "metadata": {"name": "alice-all"},
               "spec": {"users": ["alice", "ghost"], "servers": ["ws-01", "ws-03"]}}),
    )
    .await;

    let assignments = ns.api::<ServerAssignment>();
    let pairs = |enabled_shared: bool| {
        vec![
            ("alice".to_string(), "ws-01".to_string(), true, None),
            (
                "alice".to_string(),
                "ws-03".to_string(),
                enabled_shared,
                (!enabled_shared).then(|| "AssignmentDisabled".to_string()),
            ),
            (
                "ghost".to_string(),
                "ws-01".to_string(),
                false,
                Some("UnknownUser".to_string()),
            ),
            (
                "ghost".to_string(),
                "ws-03".to_string(),
                false,
                Some("UnknownUser".to_string()),
            ),
        ]
    };
    let got = |a: &ServerAssignment| {
        a.status
            .as_ref()
            .map(|s| {
                s.pairs
                    .iter()
                    .map(|p| {
                        (
                            p.user.clone(),
                            p.server.clone(),
                            p.in_effect,
                            p.reason.clone(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    wait_for("assignment pairs", LONG, || async {
        let a = assignments.get("alice-all").await.ok()?;
        (got(&a) == pairs(false)).then_some(())
    })
    .await;
    user_until(&ns, "alice", "assigned servers", |s| {
        s.assigned_servers
            == vec![
                AssignedServer {
                    server: "ws-01".into(),
                    pool: Some("dedicated".into()),
                    in_effect: true,
                },
                AssignedServer {
                    server: "ws-03".into(),
                    pool: Some("shared".into()),
                    in_effect: false,
                },
            ]
    })
    .await;
    let servers = ns.api::<Server>();
    let ws01 = wait_for("Server/ws-01 status", LONG, || async {
        let s = servers.get("ws-01").await.ok()?;
        let st = s.status.clone()?;
        (st.assigned_users
            == vec![
                AssignedUser {
                    user: "alice".into(),
                    in_effect: true,
                },
                AssignedUser {
                    user: "ghost".into(),
                    in_effect: false,
                },
            ]
            && st.sessions == Some(0))
        .then_some(st)
    })
    .await;
    let zone = ws01.zone.expect("zone from the node's label");
    assert!(support::env().zones.contains(&zone), "{zone}");
    assert_eq!(condition(&ws01.conditions, "Ready").unwrap().status, "True");
    let pools = ns.api::<ServerPool>();
    wait_for("ServerPool/dedicated status", LONG, || async {
        let p = pools.get("dedicated").await.ok()?;
        let s = p.status?;
        (s.servers == Some(1) && s.capacity == Some(4) && s.sessions == Some(0)).then_some(())
    })
    .await;

    // Enabling assignment on the shared pool puts the kept assignment in effect, everywhere.
    let before = op.settle(Duration::from_secs(3)).await;
    apply(&ns, pool("shared", true)).await;
    wait_for("pair alice/ws-03 in effect", LONG, || async {
        let a = assignments.get("alice-all").await.ok()?;
        (got(&a) == pairs(true)).then_some(())
    })
    .await;
    user_until(&ns, "alice", "ws-03 in effect", |s| {
        s.assigned_servers.iter().all(|a| a.in_effect)
    })
    .await;
    wait_for("Server/ws-03 alice in effect", LONG, || async {
        let s = servers.get("ws-03").await.ok()?;
        s.status?
            .assigned_users
            .iter()
            .any(|u| u.user == "alice" && u.in_effect)
            .then_some(())
    })
    .await;
    let after = op.settle(Duration::from_secs(3)).await;
    assert!(after > before);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        op.counter.writes(),
        after,
        "steady state wrote: {:?}",
        op.counter.snapshot()
    );

    // Removing the user from the assignment updates the views that listed her.
    apply(
        &ns,
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerAssignment",
               "metadata": {"name": "alice-all"},
               "spec": {"users": ["ghost"], "servers": ["ws-01", "ws-03"]}}),
    )
    .await;
    user_until(&ns, "alice", "no assigned servers", |s| {
        s.assigned_servers.is_empty()
    })
    .await;
    wait_for("Server/ws-01 without alice", LONG, || async {
        let s = servers.get("ws-01").await.ok()?;
        s.status?
            .assigned_users
            .iter()
            .all(|u| u.user != "alice")
            .then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn a_workspace_is_ready_once_the_groups_and_pool_it_names_exist() {
    install_crds().await;
    let ns = TestNs::new("status-ws").await;
    let op = StatusOperator::start(&ns.name).await;
    apply(
        &ns,
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace",
               "metadata": {"name": "desk"},
               "spec": {"image": "example.invalid/desktop:1", "groups": ["everyone"], "serverPool": "gpu"}}),
    )
    .await;
    let api = ns.api::<Workspace>();
    let ready_until = |want: &'static str, reason: &'static str| {
        let api = api.clone();
        async move {
            wait_for(
                &format!("Workspace/desk Ready={want} ({reason})"),
                LONG,
                || async {
                    let w = api.get("desk").await.ok()?;
                    let st = w.status?;
                    let c = condition(&st.conditions, "Ready")?;
                    (c.status == want && c.reason == reason).then(|| c.clone())
                },
            )
            .await
        }
    };
    let c = ready_until("False", "UnknownGroup").await;
    assert!(
        c.message
            .contains("spec.groups[0]: Group/everyone does not exist"),
        "{}",
        c.message
    );
    apply(&ns, group("everyone", 10, json!({}))).await;
    let c = ready_until("False", "UnknownPool").await;
    assert!(c.message.contains("spec.serverPool"), "{}", c.message);
    apply(
        &ns,
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerPool",
               "metadata": {"name": "gpu"}, "spec": {"assignmentEnabled": false}}),
    )
    .await;
    ready_until("True", "Resolved").await;
    // The printer column shows it.
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(support::kubeconfig())
        .args(["get", "workspaces.cubicle.dev", "-n", &ns.name, "desk"])
        .output()
        .expect("run kubectl");
    let table = String::from_utf8_lossy(&out.stdout);
    let mut lines = table.lines();
    let head: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let col = head
        .iter()
        .position(|h| *h == "READY")
        .unwrap_or_else(|| panic!("no READY column: {table}"));
    assert_eq!(row.get(col), Some(&"True"), "{table}");
    // A steady state writes nothing.
    let after = op.settle(Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        op.counter.writes(),
        after,
        "steady state wrote: {:?}",
        op.counter.snapshot()
    );
    op.stop().await;
}
