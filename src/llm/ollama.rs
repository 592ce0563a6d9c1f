//! ollama wire format (being written).
