//! The workspace README's Rust examples, compiled and run as doctests so they stay true,
//! and compiled without warnings, as a user pasting them would see them.
#![doc(test(attr(deny(warnings))))]

/// README.md, whose `rust` blocks are doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// docs/src/bootstrap.md (the guide), whose `rust` blocks are doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/src/bootstrap.md")]
pub struct GuideBootstrapDoctests;

/// docs/src/cache.md (the guide), whose `rust` blocks are doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/src/cache.md")]
pub struct GuideCacheDoctests;

/// docs/src/concepts.md (the guide), whose `rust` blocks are doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/src/concepts.md")]
pub struct GuideConceptsDoctests;

/// docs/src/guards.md (the guide), whose `rust` blocks are doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/src/guards.md")]
pub struct GuideGuardsDoctests;

/// docs/src/operations.md (the guide), whose `rust` blocks are doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/src/operations.md")]
pub struct GuideOperationsDoctests;

/// docs/src/rate-limits.md (the guide), whose `rust` blocks are doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/src/rate-limits.md")]
pub struct GuideRateLimitsDoctests;

/// docs/src/replicas.md (the guide), whose `rust` blocks are doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/src/replicas.md")]
pub struct GuideReplicasDoctests;
