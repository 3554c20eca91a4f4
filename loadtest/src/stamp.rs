//! [`Stamp`], the origin stamp of every workshop message: the payload of
//! each chat and typing broadcast and the body of each database row, so the
//! receiving side checks and times both the same way.

/// The origin stamp every workshop message carries.
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize)]
pub struct Stamp {
    /// Publisher (global user number).
    pub u: usize,
    /// Per-publisher sequence, from 0.
    pub s: u64,
    /// Send time, µs since the Unix epoch.
    pub ts: u64,
}
