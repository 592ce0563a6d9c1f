//! Process exit codes, from sysexits(3), so scripts and systemd can tell a usage error from a bad
//! config or a busy port.

/// Success.
pub const OK: i32 = 0;
/// Command-line usage error.
pub const USAGE: i32 = 64;
/// A needed resource is unavailable: port in use, unreadable file, missing feature.
pub const UNAVAILABLE: i32 = 69;
/// Internal software error.
pub const SOFTWARE: i32 = 70;
/// An output file (the log file, the audit log) cannot be created or opened for writing.
pub const CANTCREAT: i32 = 73;
/// Configuration error.
pub const CONFIG: i32 = 78;
