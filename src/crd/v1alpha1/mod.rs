//! Version `v1alpha1` of the Cubicle API.

// Clippy reads the repeated `type_ = ...` keys of kube's `printcolumn(...)` items as duplicated
// attributes; they are separate columns.
#![allow(clippy::duplicated_attributes)]

pub mod group;
pub mod preferences;
pub mod server;
pub mod server_assignment;
pub mod server_pool;
pub mod session;
pub mod user;
pub mod workspace;

pub use group::*;
pub use preferences::*;
pub use server::*;
pub use server_assignment::*;
pub use server_pool::*;
pub use session::*;
pub use user::*;
pub use workspace::*;
