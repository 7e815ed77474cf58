//! The `motley` command line.
