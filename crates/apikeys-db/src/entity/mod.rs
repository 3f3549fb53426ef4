//! SeaORM entities of the apikeys tables. Crate-private: the schema is described by the
//! `apikeys-migration` crate and the public API speaks in core types.

pub(crate) mod api_key;
pub(crate) mod key_change;
pub(crate) mod key_event;
pub(crate) mod organization;
pub(crate) mod owner;
pub(crate) mod product;
pub(crate) mod project;
pub(crate) mod project_product;
