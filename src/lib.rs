//! Cubicle: Kasm-style desktop and app workspaces on Kubernetes, declared as custom resources.
//!
//! The crate is both the operator binary (`cubicle`) and a library whose modules the tests use.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod apicount;
pub mod bench;
pub mod client;
pub mod controller;
pub mod crd;
pub mod credentials;
pub mod devenv;
pub mod docs;
pub mod expiry;
pub mod gateway;
pub mod http;
pub mod leader;
pub mod me;
pub mod metrics;
pub mod plan;
pub mod repo;
pub mod resolve;
pub mod telemetry;
