//! The Session controller: from a request to a running pod with its persistent profile.

pub mod build;
pub mod plan;
