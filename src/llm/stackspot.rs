//! stackspot wire format (being written).
