//! gemini wire format (being written).
