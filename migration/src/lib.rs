//! Schema migrations for apikeys (filled in by the store issue).
