//! Cross-crate integration tests and the VM test bed (tests/vm/).
