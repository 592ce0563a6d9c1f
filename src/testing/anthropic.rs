//! Fake anthropic upstream (being written).
