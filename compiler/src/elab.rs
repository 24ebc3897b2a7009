//! Elaboration (in progress).
