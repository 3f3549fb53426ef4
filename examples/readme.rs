//! The workspace README's Rust examples, compiled and run as doctests so they stay true,
//! and compiled without warnings, as a user pasting them would see them.
#![doc(test(attr(deny(warnings))))]

/// README.md, whose `rust` blocks are doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
