//! The runtime every controller shares, apart from the controllers themselves: the watches and
//! their caches ([`stores`], with the lean cached shapes of [`cached`] and the secondary
//! [`index`]), the gate in front of each controller's triggers ([`gate`]) and the Event
//! recorder ([`events`]).
//!
//! They are re-exported at `crate::controller::{cached, events, gate, index, stores}`.

pub mod cached;
pub mod events;
pub mod gate;
pub mod index;
pub mod stores;
