//! End-to-end tests against the project's own local Kubernetes control plane (real etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler; fake kubelet and storage).
//!
//! One binary, so one control plane serves the whole run; every test gets its own namespace.

mod api;
mod binary;
mod browser;
mod browser_harness;
mod dashboard;
mod demo;
mod expiry;
mod foundation;
mod gateway;
mod ha;
mod helm;
mod identity;
mod operator;
mod process;
mod promptness;
mod sessions;
mod settings;
mod status;
mod support;

/// Extra arguments of the harness's `cubicle dev up` (the real-node tests add `--real-node`).
pub const DEV_UP_ARGS: &[&str] = &[];
