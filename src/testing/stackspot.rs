//! Fake stackspot upstream (being written).
