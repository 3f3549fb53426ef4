//! Migration CLI (placeholder until the store issue).
fn main() {}
