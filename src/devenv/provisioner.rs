//! A fake dynamic storage provisioner.
//!
//! It installs two StorageClasses with provisioner [`PROVISIONER`]: `standard` (the default,
//! `WaitForFirstConsumer`, as zonal disks are on cloud providers) and `standard-immediate`
//! (`Immediate`). For each claim that the real
//! PV controller hands to it (annotation `volume.kubernetes.io/storage-provisioner`), it creates a
//! hostPath PersistentVolume pre-bound to the claim, with node affinity to one zone: the zone of
//! the node the scheduler selected (`volume.kubernetes.io/selected-node`), else the first zone
//! in the class's `allowedTopologies`, else a zone chosen by a stable hash of the claim. The real
//! PV binder in kube-controller-manager then binds the pair. So zone-pinned volumes behave as on
//! a cloud provider, and the real scheduler places pods into their volume's zone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use super::DevError;
use super::kubelet::ZONE_LABEL;

/// The provisioner name the fake StorageClasses use.
pub const PROVISIONER: &str = "fake.cubicle.dev/hostpath";
/// Name of the default StorageClass (WaitForFirstConsumer binding).
pub const DEFAULT_CLASS: &str = "standard";
/// Name of the Immediate-binding StorageClass.
pub const IMMEDIATE_CLASS: &str = "standard-immediate";

/// Installs the StorageClasses and starts provisioning. Dropping the handle stops it.
///
/// With `volume_root` (a real node runs), each volume is a directory under it, created before
/// its PersistentVolume with mode 0777 so that a non-root pod can write its profile there (the
/// kubelet would create a missing hostPath directory owned by root). Without it, the paths are
/// never created (the fake kubelet mounts nothing).
pub async fn start(
    client: Client,
    zones: Vec<String>,
    volume_root: Option<PathBuf>,
) -> Result<Provisioner, DevError> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let ssa = PatchParams::apply("cubicle-fake-provisioner").force();
    for (name, mode, default) in [
        (DEFAULT_CLASS, "WaitForFirstConsumer", "true"),
        (IMMEDIATE_CLASS, "Immediate", "false"),
    ] {
        let sc = json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name, "annotations": {
                "storageclass.kubernetes.io/is-default-class": default}},
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Retain",
            "volumeBindingMode": mode,
            "allowVolumeExpansion": true,
        });
        classes
            .patch(name, &ssa, &Patch::Apply(sc))
            .await
            .map_err(|source| DevError::Kube {
                what: format!("StorageClass {name}"),
                source,
            })?;
    }
    let zones = Arc::new(zones);
    let task = tokio::spawn(run(client, zones, volume_root));
    Ok(Provisioner { task })
}

/// A running provisioner.
pub struct Provisioner {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(client: Client, zones: Arc<Vec<String>>, volume_root: Option<PathBuf>) {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let stream = watcher(claims, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    loop {
        match stream.try_next().await {
            Ok(Some(pvc)) => {
                if let Err(e) = provision(&client, &pvc, &zones, volume_root.as_deref()).await {
                    warn!(claim = %pvc.name_any(), error = %e, "fake provisioner failed");
                }
            }
            Ok(None) => return,
            Err(e) => debug!(error = %e, "claim watch error (retrying)"),
        }
    }
}

fn make_world_writable_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
}

/// The PV name for a claim, as external provisioners name them.
pub fn volume_name(pvc: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", pvc.uid().unwrap_or_default())
}

fn stable_hash(s: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (std's hasher is randomly seeded).
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

async fn provision(
    client: &Client,
    pvc: &PersistentVolumeClaim,
    zones: &[String],
    volume_root: Option<&Path>,
) -> Result<(), kube::Error> {
    let annotations = pvc.annotations();
    let ours = annotations
        .get("volume.kubernetes.io/storage-provisioner")
        .map(String::as_str)
        == Some(PROVISIONER)
        || annotations
            .get("volume.beta.kubernetes.io/storage-provisioner")
            .map(String::as_str)
            == Some(PROVISIONER);
    let spec = pvc.spec.clone().unwrap_or_default();
    if !ours || spec.volume_name.is_some() || pvc.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let class_name = spec.storage_class_name.clone().unwrap_or_default();
    let class = Api::<StorageClass>::all(client.clone())
        .get_opt(&class_name)
        .await?;
    let wffc = class
        .as_ref()
        .and_then(|c| c.volume_binding_mode.as_deref())
        == Some("WaitForFirstConsumer");
    let selected = annotations
        .get("volume.kubernetes.io/selected-node")
        .cloned();
    let zone = if let Some(node) = &selected {
        let n = Api::<Node>::all(client.clone()).get_opt(node).await?;
        n.and_then(|n| n.labels().get(ZONE_LABEL).cloned())
    } else if wffc {
        return Ok(()); // wait for the scheduler to pick a node
    } else {
        let allowed = class
            .as_ref()
            .and_then(|c| c.allowed_topologies.as_ref())
            .and_then(|t| t.first())
            .and_then(|t| t.match_label_expressions.as_ref())
            .and_then(|e| e.iter().find(|e| e.key == ZONE_LABEL))
            .and_then(|e| e.values.first().cloned());
        allowed.or_else(|| {
            (!zones.is_empty()).then(|| {
                let key = format!("{}/{}", pvc.namespace().unwrap_or_default(), pvc.name_any());
                zones[(stable_hash(&key) % zones.len() as u64) as usize].clone()
            })
        })
    };
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage").cloned())
        .map(|q| q.0)
        .unwrap_or_else(|| "1Gi".into());
    let name = volume_name(pvc);
    let path = match volume_root {
        Some(root) => {
            let dir = root.join(&name);
            if let Err(e) = make_world_writable_dir(&dir) {
                warn!(volume = %name, dir = %dir.display(), error = %e, "cannot create the volume's directory");
            }
            dir.display().to_string()
        }
        None => format!("/var/lib/cubicle-fake-volumes/{name}"),
    };
    let mut labels = BTreeMap::new();
    if let Some(z) = &zone {
        labels.insert(ZONE_LABEL.to_string(), z.clone());
    }
    let affinity = zone.as_ref().map(|z| {
        json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": ZONE_LABEL, "operator": "In", "values": [z]}]}]}})
    });
    let pv: PersistentVolume = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
        },
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
            "persistentVolumeReclaimPolicy": class.as_ref().and_then(|c| c.reclaim_policy.clone()).unwrap_or_else(|| "Delete".into()),
            "storageClassName": class_name,
            "volumeMode": spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()),
            "hostPath": {"path": path, "type": "DirectoryOrCreate"},
            "claimRef": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": pvc.namespace(), "name": pvc.name_any(), "uid": pvc.uid(),
            },
            "nodeAffinity": affinity,
        }
    }))
    .expect("static PV object");
    match Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
    {
        Ok(_) => {
            debug!(claim = %pvc.name_any(), volume = %name, zone = ?zone, "provisioned");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}
