//! Text analysis for engram, as pure functions with no I/O and no engram dependencies: the
//! privacy scanner (personal data and secrets), the entity extractor, civil dates and
//! timestamps, and the time expressions of a query ("last week", "in May 2023").

pub mod calendar;
pub mod entities;
pub mod privacy;
pub mod temporal;
