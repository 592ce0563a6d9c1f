//! The single-server backends of the state seam: an embedded SQLite database for the hub.

mod sqlite_hub;

pub use sqlite_hub::SqliteHubStore;
