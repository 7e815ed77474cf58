//! TOML configuration: sections, validation, dotted-key overrides.
