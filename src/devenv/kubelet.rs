//! A fake kubelet: registers Nodes, keeps them Ready, runs the pods bound to them (by reporting
//! them Running and Ready) and finishes off terminating pods, the way a kubelet would.
//!
//! No container is started. It is enough for the real scheduler, garbage collector and the
//! operator to see the lifecycle they would see on a real cluster.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::DevError;

/// Label carried by every node this fake kubelet manages.
pub const FAKE_NODE_LABEL: &str = "cubicle.dev/fake-node";
/// The well-known zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const FIELD_MANAGER: &str = "cubicle-fake-kubelet";

/// One fake node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// Value of `topology.kubernetes.io/zone`.
    pub zone: String,
    /// Extra labels.
    pub labels: BTreeMap<String, String>,
    /// Allocatable CPU (cores) and memory (Gi) and pod count.
    pub cpu: u32,
    /// Memory in GiB.
    pub memory_gi: u32,
    /// Max pods.
    pub pods: u32,
}

impl NodeSpec {
    /// A node with roomy defaults.
    pub fn new(name: impl Into<String>, zone: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            zone: zone.into(),
            labels: BTreeMap::new(),
            cpu: 32,
            memory_gi: 256,
            pods: 110,
        }
    }
}

/// The default fleet: `count` nodes named `fake-node-<i>`, spread over zones `zone-a`, `zone-b`...
pub fn default_nodes(count: usize, zones: usize) -> Vec<NodeSpec> {
    (0..count)
        .map(|i| {
            let zone = format!("zone-{}", (b'a' + (i % zones.max(1)) as u8) as char);
            NodeSpec::new(format!("fake-node-{i}"), zone)
        })
        .collect()
}

fn node_object(spec: &NodeSpec) -> Node {
    let mut labels = spec.labels.clone();
    labels.insert(FAKE_NODE_LABEL.into(), "true".into());
    labels.insert(ZONE_LABEL.into(), spec.zone.clone());
    labels.insert("kubernetes.io/hostname".into(), spec.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels},
        "spec": {},
    }))
    .expect("static node object")
}

fn node_status(spec: &NodeSpec, now: &str) -> serde_json::Value {
    let cap = json!({
        "cpu": spec.cpu.to_string(),
        "memory": format!("{}Gi", spec.memory_gi),
        "pods": spec.pods.to_string(),
        "ephemeral-storage": "100Gi",
    });
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "status": {
            "capacity": cap,
            "allocatable": cap,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "fake kubelet is posting ready status",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
                {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": spec.name}],
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux",
                "kubeletVersion": "v1.33.0-fake", "kubeProxyVersion": "",
                "containerRuntimeVersion": "fake://1.0", "kernelVersion": "fake",
                "osImage": "fake", "machineID": spec.name, "systemUUID": spec.name, "bootID": "fake",
            },
        }
    })
}

/// A running fake kubelet. Dropping it stops its tasks.
pub struct FakeKubelet {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Registers `nodes`, marks them Ready and starts the heartbeat and pod loops.
pub async fn start(client: Client, nodes: Vec<NodeSpec>) -> Result<FakeKubelet, DevError> {
    let node_api: Api<Node> = Api::all(client.clone());
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    for spec in &nodes {
        node_api
            .patch(&spec.name, &ssa, &Patch::Apply(node_object(spec)))
            .await
            .map_err(|source| DevError::Kube {
                what: format!("register node {}", spec.name),
                source,
            })?;
        node_api
            .patch_status(
                &spec.name,
                &ssa,
                &Patch::Apply(node_status(spec, &now_rfc3339())),
            )
            .await
            .map_err(|source| DevError::Kube {
                what: format!("node {} status", spec.name),
                source,
            })?;
    }
    let names: Arc<HashSet<String>> = Arc::new(nodes.iter().map(|n| n.name.clone()).collect());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(heartbeat(client.clone(), nodes.clone())));
    tasks.push(tokio::spawn(run_pods(client, names)));
    Ok(FakeKubelet { tasks })
}

/// Renews each node's Lease every 10 s (the node lifecycle controller's heartbeat) and re-posts
/// Ready status every minute.
async fn heartbeat(client: Client, nodes: Vec<NodeSpec>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let node_api: Api<Node> = Api::all(client);
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    let mut tick = 0u64;
    loop {
        for spec in &nodes {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(spec.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(spec.name.clone()),
                    lease_duration_seconds: Some(40),
                    renew_time: Some(MicroTime(jiff::Timestamp::now())),
                    ..Default::default()
                }),
            };
            let mut v = serde_json::to_value(&lease).expect("lease serializes");
            v["apiVersion"] = json!("coordination.k8s.io/v1");
            v["kind"] = json!("Lease");
            if let Err(e) = leases.patch(&spec.name, &ssa, &Patch::Apply(v)).await {
                debug!(node = %spec.name, error = %e, "lease renew failed");
            }
            if tick % 6 == 5
                && let Err(e) = node_api
                    .patch_status(
                        &spec.name,
                        &ssa,
                        &Patch::Apply(node_status(spec, &now_rfc3339())),
                    )
                    .await
            {
                debug!(node = %spec.name, error = %e, "node status failed");
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Stand-ins for the desktops of running session pods, by pod uid.
type StandIns = Arc<std::sync::Mutex<std::collections::HashMap<String, super::standin::StandIn>>>;

/// The second octet of this process's pod IPs: pod IPs come from 127.0.0.0/8 (so a stand-in
/// desktop can listen on a pod's own IP without touching any other address), one /16 per
/// process so that two local control planes on one machine do not hand out the same IPs.
fn pod_ip_octet() -> u32 {
    10 + std::process::id() % 240
}

/// Watches every pod; pods bound to one of our nodes are made Running, terminating ones deleted.
async fn run_pods(client: Client, nodes: Arc<HashSet<String>>) {
    let pods: Api<Pod> = Api::all(client.clone());
    let ip = Arc::new(AtomicU32::new(2));
    let standins: StandIns = Arc::default();
    let limit = Arc::new(Semaphore::new(16));
    let stream = watcher(pods, watcher::Config::default())
        .default_backoff()
        .touched_objects();
    futures::pin_mut!(stream);
    loop {
        let pod = match stream.try_next().await {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "pod watch error (retrying)");
                continue;
            }
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if !nodes.contains(&node) {
            continue;
        }
        let client = client.clone();
        let ip = ip.clone();
        let standins = standins.clone();
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        tokio::spawn(async move {
            if let Err(e) = handle_pod(client, pod, &ip, &standins).await {
                warn!(error = %e, "fake kubelet failed to handle a pod");
            }
            drop(permit);
        });
    }
}

async fn handle_pod(
    client: Client,
    pod: Pod,
    ip: &AtomicU32,
    standins: &StandIns,
) -> Result<(), kube::Error> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    if pod.metadata.deletion_timestamp.is_some() {
        // The container stops: so does its desktop, and every connection to it.
        standins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pod.uid().unwrap_or_default());
        if !pod.finalizers().is_empty() {
            return Ok(()); // whoever set the finalizer finishes it; then we see the pod again
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        return match api.delete(&name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e),
        };
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if phase != "Pending" {
        return Ok(());
    }
    let spec = pod.spec.as_ref().expect("pod has spec");
    let now = Time(jiff::Timestamp::now());
    let n = ip.fetch_add(1, Ordering::Relaxed);
    let pod_ip = format!("127.{}.{}.{}", pod_ip_octet(), (n >> 8) & 0xff, n & 0xff);
    if let Some((port, password)) = desktop(&client, &ns, spec).await {
        match pod_ip.parse() {
            Ok(ip) => {
                match super::standin::start(std::net::SocketAddr::new(ip, port), &password).await {
                    Ok(s) => {
                        standins
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(pod.uid().unwrap_or_default(), s);
                    }
                    Err(e) => warn!(pod = %name, error = %e, "stand-in desktop not started"),
                }
            }
            Err(_) => warn!(pod = %name, "bad pod IP"),
        }
    }
    let containers: Vec<_> = spec
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(),
                "imageID": format!("fake://{}", c.image.clone().unwrap_or_default()),
                "containerID": format!("fake://{}-{}", name, c.name),
                "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    let inits: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(),
                "imageID": "", "ready": true, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                         "startedAt": now, "finishedAt": now}},
            })
        })
        .collect();
    let mut conditions = vec![
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now}),
        json!({"type": "Initialized", "status": "True", "lastTransitionTime": now}),
        json!({"type": "ContainersReady", "status": "True", "lastTransitionTime": now}),
        json!({"type": "Ready", "status": "True", "lastTransitionTime": now}),
    ];
    for gate in spec.readiness_gates.iter().flatten() {
        conditions.push(
            json!({"type": gate.condition_type, "status": "True", "lastTransitionTime": now}),
        );
    }
    let patch = json!({
        "status": {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "startTime": now,
            "conditions": conditions,
            "containerStatuses": containers,
            "initContainerStatuses": inits,
        }
    });
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The desktop a session container would serve: its port (the container port named `desktop`,
/// else KasmVNC's 6901) and password (`VNC_PW`, from its Secret). `None` for other pods.
async fn desktop(
    client: &Client,
    ns: &str,
    spec: &k8s_openapi::api::core::v1::PodSpec,
) -> Option<(u16, String)> {
    use k8s_openapi::api::core::v1::Secret;
    for c in &spec.containers {
        let Some(env) = c.env.iter().flatten().find(|e| e.name == "VNC_PW") else {
            continue;
        };
        let password = match (
            &env.value,
            env.value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref()),
        ) {
            (Some(v), _) => v.clone(),
            (None, Some(r)) => {
                let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
                let s = secrets.get(&r.name).await.ok()?;
                let b = s.data?.remove(&r.key)?;
                String::from_utf8(b.0).ok()?
            }
            _ => continue,
        };
        let port = c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("desktop"))
            .map(|p| p.container_port as u16)
            .unwrap_or(6901);
        return Some((port, password));
    }
    None
}

/// Creates the `kube-node-lease` namespace if it is missing (the API server usually makes it).
pub async fn ensure_lease_namespace(client: Client) -> Result<(), DevError> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("kube-node-lease".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(DevError::Kube {
            what: "create kube-node-lease".into(),
            source,
        }),
    }
}
