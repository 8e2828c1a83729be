//! Page-level access traces of real programs (being written).
