//! Cross-crate scenarios live in `tests/it/`; this library is empty on purpose (a package needs a target).
