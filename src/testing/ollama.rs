//! Fake ollama upstream (being written).
