//! # apikeys-db
//!
//! The store and client of apikeys (work in progress): for now it re-exports the domain types
//! of [`apikeys_core`].

#[doc(inline)]
pub use apikeys_core::*;
