//! Fake gemini upstream (being written).
