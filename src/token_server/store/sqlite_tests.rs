//! Unit tests of the SQLite store; filled in by the next commit.
