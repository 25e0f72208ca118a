//! Unit tests of the service; filled in by the next commit.
