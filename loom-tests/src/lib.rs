//! Empty library: the models live in `tests/`.
