//! Fake openai upstream (being written).
