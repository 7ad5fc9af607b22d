//! The file-backed virtual purse card (owned by the proto/foundation work).
